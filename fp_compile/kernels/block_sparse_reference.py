"""Plain-torch definition of FlashPrefill's block-sparse attention: what the Triton kernel in
``block_sparse_attention`` must compute (any dtype, any device, chunked over query rows so
the logits stay under ``CHUNK_BYTES``)."""

from __future__ import annotations

import torch

from .block_means import key_block_stats
from .utils import acc_dtype, cdiv, expand_indices, group_view, rows_per_chunk


def block_sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                     kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
                                     scale: float, block_size: int,
                                     mean_correction: bool = False, q_start: int = 0
                                     ) -> torch.Tensor:
    """Exact causal softmax attention restricted to the kept blocks. Returns (B, H, S, D).

    With ``mean_correction`` every skipped key block that lies fully before the query block
    enters the softmax as one pseudo-token: logit scale * q . kmean_j + log(count_j), value
    vmean_j (FlashPrefill V2's zero-order term). q_start: as for ``block_sparse_attention``.
    """
    B, H, SQ, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    M = cdiv(S, block_size)
    keep = expand_indices(kv_num_blocks, kv_indices)  # (B,H,n,M)
    keep_g = keep.unflatten(1, (Hkv, H // Hkv))
    out = torch.empty_like(q)
    kf, vf = k.to(acc_dtype(k)), v.to(acc_dtype(v))
    if mean_correction:
        kmean, vmean, counts = key_block_stats(k, v, block_size)
    rows_step = rows_per_chunk(B, H, S + (M if mean_correction else 0), 1)
    cols = torch.arange(S, device=q.device)
    col_block = cols // block_size
    for r0 in range(0, SQ, rows_step):
        r1 = min(SQ, r0 + rows_step)
        rows = q_start + torch.arange(r0, r1, device=q.device)
        row_block = rows // block_size
        local_block = row_block - q_start // block_size
        qc = group_view(q[:, :, r0:r1], Hkv).to(kf.dtype)
        logits = scale * torch.matmul(qc, kf.unsqueeze(2).transpose(-1, -2))  # (B,Hkv,G,r,S)
        block_ok = keep_g[:, :, :, local_block][..., col_block]  # (B,Hkv,G,r,S)
        allowed = block_ok & (cols[None, :] <= rows[:, None])
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
            o = torch.matmul(p, vf.unsqueeze(2))
        out[:, :, r0:r1] = o.flatten(1, 2).to(q.dtype)
    return out
