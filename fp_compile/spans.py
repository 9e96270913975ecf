"""The dispatch of a call with a span: padded batches, prefill over a cached prefix, KV buffers.

A plain call has q and k over the same positions 0..S-1, every key valid. A call with a span
(``kernels.utils.Span``) has its queries at key positions p0 .. p0 + S_q - 1 of a longer k / v
(a cached prefix, a static cache buffer longer than the prompt) and, per batch row, a range
[ks, ke) of valid keys (left or right padding). The op builds the span on the device from what
the model passes (``span_of``): a 2-D ``key_mask`` (B, S_kv) (nonzero = valid, e.g. Hugging
Face's ``attention_mask``) and the queries' positions ``q_pos`` (S_q,) (gpt-fast's
``input_pos``), or, when they are absent, every key valid and the queries at the end
(bottom-right alignment, p0 = S_kv - S_q). Nothing is read on the host: CUDA graphs capture it.

What a span cannot express raises, never silently computes something else: a key mask with holes
(valid keys not contiguous in a row) or positions that are not consecutive fail a device-side
assert (``torch._assert_async``) on CUDA and a ValueError naming the argument elsewhere.

Differences from the plain dispatch (``dispatch.run``), named so they are not surprises:

* the dense fallback (``dense_above``) is decided on the device, without a host read: a kv group
  whose kept density (over the blocks its rows could keep) is above ``dense_above`` gets every
  candidate block, through the same block-sparse kernel (exact, about cuDNN's speed less the
  kernel's gap at full density), not a cuDNN call. The mass guard (``mass_floor``) holds as
  usual. Below ``min_seq_len`` (compared with S_kv) the call runs masked SDPA.
* no chunking of the selection (``dispatch.INDEX_BYTES``): the index is (B, H, S_q / bs + 1, M).
* ``mean_correction``, ``fp8_attention`` and ``slash_probe`` are refused with a span
  (ValueError); ``vertical_slash`` (on by default) is switched off for the call
  (``FlashPrefillConfig.for_span``: observers and stats see the config the call ran with).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import dispatch
from .config import SPAN_UNSUPPORTED, FlashPrefillConfig
from .kernels import utils as ku
from .kernels.utils import Span


def _fail(ok: torch.Tensor, message: str) -> None:
    """Stop the call where ``ok`` (a 0-dim bool tensor) is false, without a host read on CUDA."""
    if ok.device.type == "cuda" or ku.tracing():
        torch._assert_async(ok, f"flash_prefill: {message}")
    elif not bool(ok):
        raise ValueError(f"flash_prefill: {message}")


def span_of(q: torch.Tensor, k: torch.Tensor, key_mask: Optional[torch.Tensor] = None,
            q_pos: Optional[torch.Tensor] = None) -> Span:
    """The span of a call, on q's device, from a key mask (B, S_kv) and query positions (S_q,)."""
    B, S_q, S = q.shape[0], q.shape[2], k.shape[2]
    device = q.device
    if q_pos is None:
        p0 = torch.full((1,), S - S_q, dtype=torch.int32, device=device)
    else:
        pos = q_pos.reshape(-1).to(device=device, dtype=torch.int64)
        if pos.shape[0] != S_q:
            raise ValueError(f"flash_prefill: q_pos has {pos.shape[0]} positions for "
                             f"{S_q} queries")
        first = pos[:1]
        steps = torch.arange(S_q, device=device)
        _fail(((pos == first + steps).all() & (first[0] >= 0) & (first[0] + S_q <= S)),
              f"q_pos must be consecutive positions p0 .. p0 + {S_q} - 1 within the "
              f"{S} keys")
        p0 = first.to(torch.int32)
    if key_mask is None:
        ks = torch.zeros(B, dtype=torch.int32, device=device)
        ke = torch.full((B,), S, dtype=torch.int32, device=device)
        return Span(p0, ks, ke)
    if key_mask.dim() != 2 or key_mask.shape[0] != B or key_mask.shape[1] != S:
        raise ValueError(f"flash_prefill: key_mask must be (batch, S_kv) = ({B}, {S}), got "
                         f"{tuple(key_mask.shape)}")
    valid = (key_mask != 0).to(device)
    any_valid = valid.any(dim=1)
    as_int = valid.to(torch.int32)
    first = as_int.argmax(dim=1)                              # first valid key (first max)
    last = S - as_int.flip(1).argmax(dim=1)                   # one past the last valid key
    ks = torch.where(any_valid, first, 0).to(torch.int32)
    ke = torch.where(any_valid, last, 0).to(torch.int32)
    _fail((as_int.sum(dim=1) == ke - ks).all(),
          "key_mask must mark one contiguous run of valid keys per batch row (left or right "
          "padding); this one has holes")
    return Span(p0, ks, ke)


def _check_config(config: FlashPrefillConfig) -> None:
    for name in SPAN_UNSUPPORTED:
        if getattr(config, name):
            raise ValueError(f"flash_prefill: {name}={getattr(config, name)!r} is not "
                             f"supported for padded, offset or cache-buffer calls (a key_mask, "
                             f"q_pos or S_q < S_kv)")


def masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                span: Span, return_lse: bool = False):
    """Exact attention under the span's visibility, in plain torch (the ground truth and the
    short-prompt path). Rows that see no key give 0 (and LSE -inf)."""
    B, H, S_q, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    visible = ku.span_visible(span, S_q, S)[:, None]                 # (B, 1, S_q, S)
    if not return_lse:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale,
                                             enable_gqa=H != Hkv)
        # SDPA's answer for a fully masked row differs between backends (0 or NaN): make it 0.
        return out.masked_fill(~visible.any(-1, keepdim=True), 0)
    G = H // Hkv
    kf = k.repeat_interleave(G, dim=1).to(ku.acc_dtype(q))
    vf = v.repeat_interleave(G, dim=1).to(ku.acc_dtype(q))
    logits = scale * q.to(kf.dtype) @ kf.transpose(-1, -2)
    logits = logits.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    p = torch.exp(logits - torch.where(lse.isneginf(), 0, lse)[..., None])
    return (p @ vf).to(q.dtype), lse.float()


def candidate_blocks(span: Span, S_q: int, S: int, block_size: int) -> torch.Tensor:
    """(B, n) the key blocks each selection row could keep (for stats' density)."""
    n = ku.span_rows(S_q, block_size)
    i = span.p0.long() // block_size + torch.arange(n, device=span.p0.device)        # (n,)
    first = span.ks.long()[:, None] // block_size
    last = torch.minimum((span.ke.long()[:, None] - 1) // block_size, i[None, :])
    has_rows = (i[None, :] * block_size < span.p0.long() + S_q) & (
        (i[None, :] + 1) * block_size > span.ks.long()[:, None])
    return torch.where(has_rows & (span.ke[:, None] > span.ks[:, None]),
                       (last - first + 1).clamp_min(0), 0)


def dense_where_flagged(sel: dispatch.Selection, span: Span, S_q: int, S: int, num_kv_heads: int,
                        config: FlashPrefillConfig) -> tuple[dispatch.Selection, torch.Tensor]:
    """The selection with every candidate block for the kv groups whose kept density is above
    ``config.dense_above``, and those (B, Hkv) flags: on the device, no host read."""
    B, H, n = sel.num.shape
    M = sel.idx.shape[-1]
    cand = candidate_blocks(span, S_q, S, config.block_size).to(torch.int32)       # (B, n)
    kept = sel.num.to(torch.float32).sum(-1).view(B, num_kv_heads, H // num_kv_heads).mean(-1)
    flags = kept > config.dense_above * cand.sum(-1, keepdim=True).to(torch.float32)
    heads = flags.repeat_interleave(H // num_kv_heads, dim=1)                     # (B, H)
    first = (span.ks.long() // config.block_size)[:, None, None]                 # (B, 1, 1)
    m = torch.arange(M, device=sel.idx.device)
    full_idx = torch.where(m < cand[:, :, None], first + m, 0).to(torch.int32)   # (B, n, M)
    num = torch.where(heads[:, :, None], cand[:, None, :], sel.num)
    idx = torch.where(heads[:, :, None, None], full_idx[:, None], sel.idx)
    mass = None if sel.mass is None else sel.mass.masked_fill(heads[:, :, None], 1.0)
    return dispatch.Selection(num, idx, mass), flags


def select(q: torch.Tensor, k: torch.Tensor, scale: float, config: FlashPrefillConfig,
           span: Span, *, with_mass: bool = False) -> dispatch.Selection:
    """The selection of a span call: rows ``ku.span_rows(S_q, bs)`` from query block p0 // bs.
    ``config`` runs as ``config.for_span()``."""
    config = config.for_span()
    _check_config(config)
    if not dispatch.use_triton(q, config.kernel):
        from .kernels.pattern_search import select_mask_reference

        keep, mass = select_mask_reference(
            q, k, scale, config.block_size, config.alpha, config.sink_blocks,
            config.window_blocks, config.last_dense_blocks, config.gqa_shared,
            mass_floor=config.mass_floor, return_mass=True, span=span)
        return dispatch.Selection(*ku.compact_mask(keep), mass if with_mass else None)
    from .kernels.block_means import block_means
    from .kernels.pattern_search import pattern_search

    kmean = block_means(k, config.block_size, out_dtype=q.dtype, span=span)
    num, idx, *mass = pattern_search(
        q, k, scale, config.block_size, config.alpha, config.sink_blocks, config.window_blocks,
        config.last_dense_blocks, gqa_shared=config.gqa_shared, kmean=kmean,
        mass_floor=config.mass_floor, return_mass=with_mass, span=span)
    return dispatch.Selection(num, idx, mass[0] if mass else None)


def attend(q, k, v, scale: float, config: FlashPrefillConfig, span: Span,
           sel: dispatch.Selection, return_lse: bool = False):
    """Block-sparse attention of a span call over its selection (+ the LSE when asked)."""
    if not dispatch.use_triton(q, config.kernel):
        from .kernels.block_sparse_attention import block_sparse_attention_reference

        return block_sparse_attention_reference(q, k, v, sel.num, sel.idx, scale,
                                                config.block_size, span=span,
                                                return_lse=return_lse)
    from .kernels.block_sparse_attention import block_sparse_attention, capture_tile

    tile = capture_tile(q, config.block_size) if dispatch._capturing(q) else None
    lse = None
    if return_lse:
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    out = block_sparse_attention(q, k, v, sel.num, sel.idx, scale, config.block_size,
                                 tile=tile, span=span, lse=lse)
    return (out, lse) if return_lse else out


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
        config: FlashPrefillConfig, layer: int = -1, key_mask: Optional[torch.Tensor] = None,
        q_pos: Optional[torch.Tensor] = None, return_lse: bool = False):
    """The op for a call with a key mask, query positions or S_q < S_kv (see the module doc).

    Returns out (B, H, S_q, D), or (out, lse (B, H, S_q) fp32) with ``return_lse``."""
    scale = ku.default_scale(q.shape[-1], scale)
    config = config.for_span()
    for fn in list(dispatch._observers):
        fn(layer, q, k, scale, config)
    _check_config(config)
    span = span_of(q, k, key_mask, q_pos)
    if k.shape[2] < config.min_seq_len:
        if config.collect_stats:
            _record(layer, q, k, config, span, None, key_mask, q_pos)
        return masked_sdpa(q, k, v, scale, span, return_lse)
    sel = select(q, k, scale, config, span, with_mass=config.collect_stats)
    flags = None
    if config.dense_above < 1:
        sel, flags = dense_where_flagged(sel, span, q.shape[2], k.shape[2], k.shape[1], config)
    result = attend(q, k, v, scale, config, span, sel, return_lse)
    if config.collect_stats:
        _record(layer, q, k, config, span, sel, key_mask, q_pos, flags)
    return result


def reference(q, k, v, scale: float | None, config: FlashPrefillConfig,
              key_mask: Optional[torch.Tensor] = None, q_pos: Optional[torch.Tensor] = None,
              return_lse: bool = False):
    """``run`` in plain torch, whatever ``config.kernel`` says: what the kernels must equal."""
    ref = config.replace(kernel="reference", collect_stats=False)
    return run(q, k, v, scale, ref, -1, key_mask, q_pos, return_lse)


def form(q_len: int, kv_len: int, key_mask: bool, q_pos: bool) -> str:
    """How a call's span came about, in the report's words."""
    parts = []
    if key_mask:
        parts.append("padded")
    if q_pos:
        parts.append("cache buffer")
    elif q_len != kv_len:
        parts.append("offset")
    return " + ".join(parts) or "plain"


def _record(layer, q, k, config, span: Span, sel, key_mask, q_pos, flags=None) -> None:
    from .stats import record

    cand = None if sel is None else candidate_blocks(span, q.shape[2], k.shape[2],
                                                     config.block_size)
    record(layer, k.shape[2], q.shape[0], config.block_size, config.alpha,
           None if sel is None else sel.num, q.shape[1], mass=None if sel is None else sel.mass,
           dense_groups=flags, candidates=cand,
           form=form(q.shape[2], k.shape[2], key_mask is not None, q_pos is not None),
           options=config.options_summary())
