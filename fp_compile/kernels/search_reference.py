"""The plain-torch definition of the pattern search (``pattern_search.py`` computes it).

Block scores of the key-block means, the structural blocks, the mass guard's ladder and the
threshold, for the whole causal sequence or for a call with a span (issue 11, ``Span`` in
utils.py). The span's geometry, block by block: for batch row b and absolute query block i,
the rows R(b, i) that score it, the candidate key blocks C(b, i), where the sinks start and
the last query block that has keys (dense rows count back from it). A call without a span
is the span p0 = 0, ks = 0, ke = S_q: ``span_blocks(None, ...)`` builds exactly that one, so
both cases follow one rule.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .block_means import key_block_means
from .slash_probe import slash_probe_flags
from .utils import (Span, cdiv, compact_mask, gqa_union, group_view, rows_per_chunk,
                    span_rows)
from .vertical_slash import add_vertical_slash, vertical_slash_flags_reference


class SpanBlocks(NamedTuple):
    """Query blocks i = i0 .. i1 - 1 (absolute) of every batch row b; n = i1 - i0.

    rows: (B, n * block_size) bool, the rows of R(b, i), block after block (the grid of key
    positions i0 * block_size ...); q's rows [q_lo, q_hi) cover the grid from its row ``pad``.
    candidate: (B, n, M) bool, C(b, i) = {j <= i holding a valid key}, empty where R(b, i) is.
    first: (B, 1, 1) ceil(ks / block_size): the sinks are the ``sink_blocks`` blocks from it on
    and the partial block before it, so they hold the row's first sink_blocks * block_size valid
    keys (an unaligned start does not shrink them to a few keys).
    last: (B, 1, 1) (min(ke, p0 + S_q) - 1) // block_size.
    """
    rows: torch.Tensor
    q_lo: int
    q_hi: int
    pad: int
    candidate: torch.Tensor
    first: torch.Tensor
    last: torch.Tensor


def span_blocks(span: Span | None, B: int, S_q: int, M: int, block_size: int, i0: int, i1: int,
                device) -> SpanBlocks:
    """The geometry of query blocks [i0, i1) under ``span`` (None: the whole causal sequence).

    The reference reads p0 on the host (the kernel never does)."""
    if span is None:
        p0 = 0
        ks = torch.zeros(B, dtype=torch.long, device=device)
        ke = torch.full((B,), S_q, dtype=torch.long, device=device)
    else:
        p0 = int(span.p0.reshape(()).item())
        ks, ke = span.ks.to(device, torch.long), span.ke.to(device, torch.long)
    n = i1 - i0
    pos = torch.arange(i0 * block_size, i1 * block_size, device=device)
    in_call = (pos >= p0) & (pos < p0 + S_q)
    rows = in_call[None, :] & (pos[None, :] >= ks[:, None])
    q_lo = min(max(i0 * block_size - p0, 0), S_q)
    q_hi = max(min(i1 * block_size - p0, S_q), q_lo)
    live = rows.view(B, n, block_size).any(dim=-1)[:, :, None]
    i = torch.arange(i0, i1, device=device)[None, :, None]
    j = torch.arange(M, device=device)[None, None, :]
    first = (-(-ks // block_size))[:, None, None]
    has_keys = (ke > ks)[:, None, None]
    candidate = ((j >= (ks // block_size)[:, None, None])
                 & (j <= ((ke - 1) // block_size)[:, None, None]) & (j <= i))
    last = ((ke.clamp(max=p0 + S_q) - 1) // block_size)[:, None, None]
    return SpanBlocks(rows, q_lo, q_hi, q_lo + p0 - i0 * block_size,
                      candidate & has_keys & live, first, last)


def check_row_stride(row_stride, block_size: int, span: bool, what: str) -> None:
    """A strided search (``FlashPrefillConfig.search_stride``): 1, 2, 4 or 8, leaving >= 16
    rows of each block (a tensor-core dot's least width in the Triton search; the reference
    refuses the same, so a config fails alike on every device), and no span."""
    if row_stride == 1:
        return
    if row_stride not in (2, 4, 8) or block_size // row_stride < 16:
        raise ValueError(
            f"{what}: FlashPrefillConfig.search_stride must be 1, 2, 4 or 8 and leave at least "
            f"16 rows of each block, got {row_stride} with block_size {block_size}")
    if span:
        raise ValueError(f"{what}: FlashPrefillConfig.search_stride > 1 does not combine with "
                         f"a span (padded/offset call)")


def block_scores_reference(q: torch.Tensor, kmean: torch.Tensor, scale: float, block_size: int,
                           q_block_start: int, q_block_end: int, *,
                           span: Span | None = None, row_stride: int = 1) -> torch.Tensor:
    """Unnormalised block scores of query blocks [q_block_start, q_block_end).

    score_ij = sum over the rows r of R(b, i) of exp(scale * q_r . kmean_j - m_i), for the
    scored key blocks j < i of C(b, i), where m_i is the max of those logits (``span_blocks``;
    without a span R is the real rows of block i and C every j <= i). Other entries are 0.
    ``row_stride`` n > 1 (no span): R keeps only the rows at offsets 0, n, 2n, ... of each block.
    Returns (B, H, n, M) fp32. (The paper normalises each row to sum 1; the threshold is
    relative to the row max, so that scaling never changes the selection.) With a span the
    blocks are absolute and kmean holds the means of the valid keys.
    """
    B, H, S, D = q.shape
    Hkv, M = kmean.shape[1], kmean.shape[2]
    n = q_block_end - q_block_start
    blocks = span_blocks(span, B, S, M, block_size, q_block_start, q_block_end, q.device)
    qc = group_view(q[:, :, blocks.q_lo:blocks.q_hi], Hkv).to(kmean.dtype)
    logits = scale * torch.matmul(qc, kmean.unsqueeze(2).transpose(-1, -2))  # (B,Hkv,G,rows,M)
    after = n * block_size - blocks.pad - (blocks.q_hi - blocks.q_lo)
    logits = F.pad(logits, (0, 0, blocks.pad, after), value=float("-inf"))
    logits = logits.view(B, Hkv, -1, n, block_size, M)
    scored = _scored(blocks, q_block_start, q_block_end)  # (B, n, M)
    rows = blocks.rows
    if row_stride > 1:
        rows = rows & (torch.arange(rows.shape[1], device=q.device) % row_stride == 0)
    used = rows.view(B, 1, 1, n, block_size, 1) & scored.view(B, 1, 1, n, 1, M)
    logits = logits.masked_fill(~used, float("-inf"))
    m = logits.amax(dim=(-2, -1), keepdim=True)
    # Rows with no key block scored (i == 0) have m = -inf; keep them at zero, not NaN.
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    scores = torch.exp(logits - m).sum(dim=-2)  # (B,Hkv,G,n,M)
    if span is not None:
        # each block weighted by its share of valid keys (a full block: 1), so a boundary block
        # of a few keys does not score like a full one
        j = torch.arange(M, device=q.device)
        ks, ke = span.ks.to(q.device, torch.long), span.ke.to(q.device, torch.long)
        count = (torch.minimum(ke[:, None], (j + 1) * block_size)
                 - torch.maximum(ks[:, None], j * block_size)).clamp_min(1)
        scores = scores * (count.to(scores.dtype) / block_size)[:, None, None, None, :]
    return scores.flatten(1, 2)


def _scored(blocks: SpanBlocks, i0: int, i1: int) -> torch.Tensor:
    """(B, n, M): the scored blocks, j < i of C(b, i) (the diagonal block is never scored)."""
    i = torch.arange(i0, i1, device=blocks.candidate.device)[:, None]
    j = torch.arange(blocks.candidate.shape[-1], device=i.device)[None, :]
    return blocks.candidate & (j < i)


def structural_keep(M: int, n_start: int, n_end: int, sink_blocks: int, window_blocks: int,
                    last_dense_blocks: int, device, *,
                    blocks: SpanBlocks | None = None) -> torch.Tensor:
    """Blocks kept whatever the scores say, for query blocks [n_start, n_end): (n, M) bool.

    With ``blocks`` (the span's geometry of those query blocks): (B, n, M), sinks counted from
    the row's first key block, dense rows back from its last query block with keys, all
    within C(b, i). Without: the whole causal sequence, counted in blocks.
    """
    full = blocks is None
    if full:
        blocks = span_blocks(None, 1, M, M, 1, n_start, n_end, device)
    i = torch.arange(n_start, n_end, device=device)[None, :, None]
    j = torch.arange(M, device=device)[None, None, :]
    keep = ((j < blocks.first + sink_blocks) | (j > i - window_blocks)
            | (i > blocks.last - last_dense_blocks))
    keep = keep & blocks.candidate
    return keep[0] if full else keep


# The mass guard's ladder of relative thresholds: alpha, alpha/4, alpha/16, alpha/64, then every
# causal block. A row takes the first rung whose kept estimated mass reaches the floor: no sort.
GUARD_RATIO = 0.25
GUARD_RUNGS = 5


def guard_rungs(alpha: float) -> list[float]:
    """The ladder's relative thresholds, largest first; the last (0) keeps every causal block."""
    return [alpha * GUARD_RATIO ** c for c in range(GUARD_RUNGS - 1)] + [0.0]


def guarded_choice(scores: torch.Tensor, scored: torch.Tensor, structural: torch.Tensor,
                   alpha: float, mass_floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The threshold step with the mass guard: (chosen (B, H, n, M) bool, kept mass (B, H, n)).

    scores (B, H, n, M) fp32 block scores (0 where not scored); scored (n, M): j < i of a
    scored row; structural (n, M): always-kept blocks. The normalised scores
    p_ij = score_ij / sum_j score_ij estimate row i's attention mass per key block (blocks
    j < i; the diagonal block is never scored). A row keeps the blocks of the first rung of
    ``guard_rungs(alpha)`` whose kept estimated mass is at least ``mass_floor``; with
    ``mass_floor`` 0 that is the paper's threshold. The kept mass returned is that rung's
    (1 for rows with nothing scored). NaN scores keep every block, as the paper rule does here.
    """
    rowmax = scores.amax(dim=-1, keepdim=True)
    weight = torch.where(scored & ~scores.isnan(), scores, torch.zeros_like(scores))
    total = weight.sum(dim=-1)
    chosen = mass = None
    for t in guard_rungs(alpha):
        # "not below" rather than ">=": NaN scores keep their block, so NaN/inf inputs spread
        # through the output as they would in dense attention.
        keep = (~(scores < t * rowmax) & scored) | structural
        kept = (weight * keep).sum(dim=-1)
        ok = kept >= mass_floor * total
        if chosen is None:
            chosen, mass, settled = keep, kept, ok
            continue
        chosen = torch.where(settled[..., None], chosen, keep)
        mass = torch.where(settled, mass, kept)
        settled = settled | ok
    share = torch.where(total > 0, mass / total.clamp_min(torch.finfo(total.dtype).tiny),
                        torch.ones_like(total))
    return chosen, share


def select_mask_reference(q: torch.Tensor, k: torch.Tensor, scale: float, block_size: int,
                          alpha: float, sink_blocks: int, window_blocks: int,
                          last_dense_blocks: int, gqa_shared: bool = False,
                          vertical_slash: bool = False, vs_threshold: float = 0.015,
                          mass_floor: float = 0.0, *, return_mass: bool = False,
                          span: Span | None = None, slash_probe: float = 0.0,
                          vs_rows: int = 0, search_stride: int = 1):
    """Kept (query block, key block) pairs as a dense bool mask (B, H, M, M).

    With ``mass_floor`` > 0 a row whose kept estimated mass falls below it keeps more blocks
    (``guarded_choice``). With ``vertical_slash``, key blocks of heavy columns and diagonals
    found by ``vertical_slash_flags_reference`` (probe rows: the prompt's last ``vs_rows``, 0
    the last query block's) are added to every query block they reach;
    with ``slash_probe`` (kappa) > 0, the diagonals of ``slash_probe_flags`` likewise.
    ``return_mass``: also return the estimated kept mass per row (B, H, M) fp32 (1 for dense
    rows), before the vertical/slash and GQA additions.
    ``span``: q (B, H, S_q, D) at key positions p0 .. p0 + S_q - 1 of k (B, Hkv, S, D), valid
    keys ks[b] <= j < ke[b]; the mask is then (B, H, n, M), n = span_rows(S_q, block_size),
    row t the absolute query block p0 // block_size + t (the mass (B, H, n)).
    ``search_stride`` n > 1: each query block is scored by every n-th of its rows
    (``block_scores_reference``'s row_stride); not with a span.
    """
    for name, on in (("vertical_slash=True", vertical_slash), ("slash_probe", slash_probe > 0)):
        if span is not None and on:
            raise ValueError(f"select_mask_reference: {name} is not supported with a span "
                             f"(padded/offset call)")
    check_row_stride(search_stride, block_size, span is not None, "select_mask_reference")
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    M = cdiv(k.shape[2], block_size)
    i_base, n = (0, M) if span is None else (int(span.p0.reshape(()).item()) // block_size,
                                             span_rows(S, block_size))
    kmean = key_block_means(k, block_size, span)
    if q.dtype in (torch.float16, torch.bfloat16):
        # The key means are rounded to the inputs' 16-bit dtype, as the Triton search feeds
        # them to a tensor-core dot (fp32 accumulation); scores are then fp32 sums as here.
        kmean = kmean.to(q.dtype).to(kmean.dtype)
    keep = torch.empty(B, H, n, M, dtype=torch.bool, device=q.device)
    mass = torch.ones(B, H, n, dtype=kmean.dtype, device=q.device)
    step = max(1, rows_per_chunk(B, H, M, block_size) // block_size)
    for t0 in range(0, n, step):
        t1 = min(n, t0 + step)
        i0, i1 = i_base + t0, i_base + t1
        scores = block_scores_reference(q, kmean, scale, block_size, i0, i1, span=span,
                                        row_stride=search_stride)
        blocks = span_blocks(span, B, S, M, block_size, i0, i1, q.device)
        structural = structural_keep(M, i0, i1, sink_blocks, window_blocks, last_dense_blocks,
                                     q.device, blocks=blocks)[:, None]
        chosen, kept = guarded_choice(scores, _scored(blocks, i0, i1)[:, None], structural,
                                      alpha, mass_floor)
        keep[:, :, t0:t1] = chosen | structural
        i = torch.arange(i0, i1, device=q.device)
        dense_row = i > blocks.last[:, :, 0] - last_dense_blocks   # (B, n)
        mass[:, :, t0:t1] = torch.where(dense_row[:, None], torch.ones_like(kept), kept)
    if vertical_slash:
        keep = add_vertical_slash(
            keep, *vertical_slash_flags_reference(q, k, scale, block_size, vs_threshold,
                                                  vs_rows or None))
    if slash_probe > 0:
        keep = add_vertical_slash(keep, *slash_probe_flags(q, k, scale, block_size, slash_probe))
    if gqa_shared:
        keep = gqa_union(keep, Hkv)
    return (keep, mass) if return_mass else keep


def pattern_search_reference(q: torch.Tensor, k: torch.Tensor, scale: float, block_size: int,
                             alpha: float, sink_blocks: int, window_blocks: int,
                             last_dense_blocks: int, *, gqa_shared: bool = False,
                             mass_floor: float = 0.0, return_mass: bool = False,
                             span: Span | None = None, row_stride: int = 1):
    """Plain-torch definition of ``pattern_search`` (same arguments and outputs)."""
    keep, mass = select_mask_reference(q, k, scale, block_size, alpha, sink_blocks,
                                       window_blocks, last_dense_blocks, gqa_shared,
                                       mass_floor=mass_floor, return_mass=True, span=span,
                                       search_stride=row_stride)
    num, idx = compact_mask(keep)
    return (num, idx, mass) if return_mass else (num, idx)
