"""Plain-torch definition of FlashPrefill's block-sparse attention: what the Triton kernel in
``block_sparse_attention`` must compute (any dtype, any device, chunked over query rows so
the logits stay under ``CHUNK_BYTES``)."""

from __future__ import annotations

import torch

from .block_means import key_block_stats
from .utils import (Span, acc_dtype, cdiv, expand_indices, group_view, rows_per_chunk,
                    span_rows, span_visible)


def check_span_options(what: str, mean_correction: bool, lse: bool, span: Span | None,
                       q_start: int) -> None:
    """The option combinations the kernel and the reference refuse alike."""
    if span is not None and mean_correction:
        raise ValueError(f"{what}: mean_correction=True is not supported with a span "
                         "(padded/offset call)")
    if span is not None and q_start:
        raise ValueError(f"{what}: q_start and span are exclusive (a span's p0 places the "
                         "queries)")
    if lse and mean_correction:
        raise ValueError(f"{what}: the log-sum-exp is not defined with mean_correction=True "
                         "(its pseudo-tokens are not keys)")


def check_span_and_lse(span: Span | None, lse: torch.Tensor | None, q: torch.Tensor,
                        kv_num_blocks: torch.Tensor, block_size: int) -> None:
    """The kernel's checks of a span and an LSE buffer: shapes, dtypes and devices only
    (metadata): p0, ks, ke are never read here."""
    B, H, SQ, _ = q.shape
    if span is not None:
        p0, ks, ke = span
        for name, t, shape in (("p0", p0, (1,)), ("ks", ks, (B,)), ("ke", ke, (B,))):
            if t.dtype != torch.int32 or tuple(t.shape) != shape or t.device != q.device:
                raise ValueError(f"block_sparse_attention: span.{name} must be an int32 "
                                 f"{shape} tensor on {q.device}, got {t.dtype} "
                                 f"{tuple(t.shape)} on {t.device}")
        rows = span_rows(SQ, block_size)
        if kv_num_blocks.shape[-1] != rows:
            raise ValueError(f"block_sparse_attention: a span's selection has span_rows(S_q, "
                             f"block_size) = {rows} rows, got {kv_num_blocks.shape[-1]}")
    if lse is not None and (lse.dtype != torch.float32 or tuple(lse.shape) != (B, H, SQ)
                            or lse.device != q.device):
        raise ValueError(f"block_sparse_attention: lse must be a float32 {(B, H, SQ)} tensor "
                         f"on {q.device}, got {lse.dtype} {tuple(lse.shape)} on {lse.device}")


def block_sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                     kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
                                     scale: float, block_size: int,
                                     mean_correction: bool = False, q_start: int = 0,
                                     span: Span | None = None, return_lse: bool = False
                                     ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact causal softmax attention restricted to the kept blocks. Returns (B, H, S, D).

    With ``mean_correction`` every skipped key block that lies fully before the query block
    enters the softmax as one pseudo-token: logit scale * q . kmean_j + log(count_j), value
    vmean_j (FlashPrefill V2's zero-order term). q_start: as for ``block_sparse_attention``.
    span: q sits at positions p0 .. p0 + S_q - 1, keys are masked by ``span_visible`` as well,
    selection row t belongs to query block p0 // block_size + t (``span_rows`` rows); rows that
    see no key give 0. return_lse: also return the natural-log LSE (B, H, S_q) of
    scale * q . k over each row's visible kept keys (-inf where none), in the accumulation
    dtype.
    """
    check_span_options("block_sparse_attention_reference", mean_correction, return_lse, span,
                       q_start)
    B, H, SQ, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    M = cdiv(S, block_size)
    keep = expand_indices(kv_num_blocks, kv_indices)  # (B,H,n,M)
    keep_g = keep.unflatten(1, (Hkv, H // Hkv))
    out = torch.empty_like(q)
    kf, vf = k.to(acc_dtype(k)), v.to(acc_dtype(v))
    lse = q.new_empty((B, H, SQ), dtype=kf.dtype) if return_lse else None
    if mean_correction:
        kmean, vmean, counts = key_block_stats(k, v, block_size)
    rows_step = rows_per_chunk(B, H, S + (M if mean_correction else 0), 1)
    cols = torch.arange(S, device=q.device)
    col_block = cols // block_size
    # A tensor p0 stays on the device: no host read, as in the kernel.
    p0 = q_start if span is None else span.p0.to(q.device).long().reshape(())
    for r0 in range(0, SQ, rows_step):
        r1 = min(SQ, r0 + rows_step)
        rows = p0 + torch.arange(r0, r1, device=q.device)
        row_block = rows // block_size
        local_block = row_block - p0 // block_size
        qc = group_view(q[:, :, r0:r1], Hkv).to(kf.dtype)
        logits = scale * torch.matmul(qc, kf.unsqueeze(2).transpose(-1, -2))  # (B,Hkv,G,r,S)
        block_ok = keep_g[:, :, :, local_block][..., col_block]  # (B,Hkv,G,r,S)
        if span is None:
            allowed = block_ok & (cols[None, :] <= rows[:, None])
        else:
            chunk = Span(span.p0 + r0, span.ks, span.ke)
            allowed = block_ok & span_visible(chunk, r1 - r0, S)[:, None, None]
        logits = logits.masked_fill(~allowed, float("-inf"))
        if mean_correction:
            skipped = ~keep_g[:, :, :, local_block] & (
                torch.arange(M, device=q.device)[None, :] < row_block[:, None])
            pseudo = scale * torch.matmul(qc, kmean.unsqueeze(2).transpose(-1, -2))
            pseudo = (pseudo + counts.log()).masked_fill(~skipped, float("-inf"))
            p = torch.softmax(torch.cat([logits, pseudo], dim=-1), dim=-1)
            o = torch.matmul(p[..., :S], vf.unsqueeze(2)) + torch.matmul(
                p[..., S:], vmean.unsqueeze(2))
        else:
            p = torch.softmax(logits, dim=-1)
            if span is not None:   # a row that sees no key: 0, not softmax's NaN
                p = p.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
            o = torch.matmul(p, vf.unsqueeze(2))
        out[:, :, r0:r1] = o.flatten(1, 2).to(q.dtype)
        if lse is not None:
            lse[:, :, r0:r1] = torch.logsumexp(logits, dim=-1).flatten(1, 2)
    return (out, lse) if return_lse else out
