"""Triton pattern search of FlashPrefill: which key blocks each query block keeps.

Computes exactly ``reference.compact_mask(reference.select_mask_reference(...))`` without ever
writing a (B, H, M, M) score tensor, sorting or taking a top-k:

* ``_block_means_kernel``: mean key (and value) of every key block, padding excluded.
* ``_pattern_search_kernel``: one program per (batch, query head, query block i) — or per
  (batch, kv head, i) when the heads of a GQA group share one kept set. The program scores its
  row of blocks against the key-block means in tiles of ``TJ`` key blocks, once:

  1. pass A scores each tile, parks the fp32 log2 scores in the row's own ``kv_indices``
     storage and tracks ``max_j log2 score_ij``;
  2. pass B reads them back, thresholds them and compacts the kept block indices in place
     (prefix sum of the keep flags plus a running count), so the row comes out ascending; the
     unused tail of the row is then written with 0.

  Scores live in the log2 domain: ``log2 score_ij = m_j + log2 sum_r 2^(l_rj - m_j)`` with l
  the logits in log2 units and m_j the max logit of key block j over the query block's rows.
  The reference's shared row max cancels in the relative threshold ``score_ij >= alpha * max_j score_ij``, so the log form
  keeps the same blocks (up to rounding at exact ties) without overflow. NaN scores keep their
  block, and a NaN anywhere in a row keeps the whole row, as the reference's
  ``~(s < alpha * max)``.

Cost: one tensor-core dot per (query block, key block) pair, one exp per (query row, key block),
and a write + read of the row's scores parked in the row's own kv_indices storage (pass A to
pass B below), instead of scoring every row twice.

Logits accumulate in fp32. For fp16/bf16 q the key means are rounded once to q's dtype
(the reference rounds them the same way); fp32 q uses an ieee fp32 dot, so fp32 selections
equal the reference's bit for bit apart from exact ties.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import reference as ref

_LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _block_means_kernel(k_ptr, v_ptr, kmean_ptr, vmean_ptr,
                        skb, skh, sks, skd, svb, svh, svs, svd,
                        S, M, Hkv,
                        BLOCK: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                        ROWS: tl.constexpr, HAS_V: tl.constexpr):
    """One program per (key block j, batch * kv head): fp32 means over the block's real rows."""
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    h = (bh % Hkv).to(tl.int64)
    d = tl.arange(0, DP)
    d_ok = d < D
    k_sum = tl.zeros([DP], dtype=tl.float32)
    v_sum = tl.zeros([DP], dtype=tl.float32)
    for r0 in tl.static_range(0, BLOCK, ROWS):
        rows = j * BLOCK + r0 + tl.arange(0, ROWS)
        msk = (rows < S)[:, None] & d_ok[None, :]
        kt = tl.load(k_ptr + b * skb + h * skh + rows[:, None].to(tl.int64) * sks
                     + d[None, :] * skd, mask=msk, other=0.0)
        k_sum += tl.sum(kt.to(tl.float32), axis=0)
        if HAS_V:
            vt = tl.load(v_ptr + b * svb + h * svh + rows[:, None].to(tl.int64) * svs
                         + d[None, :] * svd, mask=msk, other=0.0)
            v_sum += tl.sum(vt.to(tl.float32), axis=0)
    count = tl.minimum(S - j * BLOCK, BLOCK).to(tl.float32)
    out = (bh.to(tl.int64) * M + j) * D + d
    tl.store(kmean_ptr + out, (k_sum / count).to(kmean_ptr.dtype.element_ty), mask=d_ok)
    if HAS_V:
        tl.store(vmean_ptr + out, (v_sum / count).to(vmean_ptr.dtype.element_ty), mask=d_ok)


def block_means(k: torch.Tensor, block_size: int, v: torch.Tensor | None = None, *,
                out_dtype: torch.dtype = torch.float32):
    """Mean key (and value) of every key block, padding excluded.

    k, v: (B, Hkv, S, D), any strides, fp16/bf16/fp32. Returns kmean (B, Hkv, M, D), or
    (kmean, vmean) when v is given; M = ceil(S / block_size). Sums are fp32; the means are
    stored (rounded once) in ``out_dtype``.
    """
    B, Hkv, S, D = k.shape
    M = (S + block_size - 1) // block_size
    kmean = torch.empty((B, Hkv, M, D), dtype=out_dtype, device=k.device)
    vmean = torch.empty_like(kmean) if v is not None else kmean
    vv = v if v is not None else k
    DP = max(16, triton.next_power_of_2(int(D)))
    # Row chunks keep the per-program tile at <= 4K elements (no register spills at D = 256).
    rows = max(1, min(block_size, 4096 // DP))
    wrap_triton(_block_means_kernel)[(M, B * Hkv)](
        k, vv, kmean, vmean, *k.stride(), *vv.stride(), S, M, Hkv,
        BLOCK=block_size, D=D, DP=DP, ROWS=rows, HAS_V=v is not None, num_warps=4)
    return kmean if v is None else (kmean, vmean)


@triton.jit
def _tile_log2_scores(qt, kmean_row, j0, n_cols, row_ok, qk_scale,
                      D: tl.constexpr, DP: tl.constexpr, TJ: tl.constexpr,
                      IEEE: tl.constexpr):
    """log2 score_ij of key blocks j0 .. j0 + TJ for one query block; -inf for j >= n_cols.

    qt: (DP, BLOCK) the query rows, transposed (padding rows and dims 0); kmean_row: this
    (batch, kv head)'s key means (M, D) in q's dtype (fp32 for fp32 q). qk_scale =
    scale * log2(e). Returns (TJ,) fp32: m_j + log2 sum_r 2^(l_jr - m_j), m_j the max real
    logit of key block j.

    The logits are computed transposed, key blocks x query rows, so that every reduction runs
    along axis 1, the axis a tensor-core tile keeps inside one warp; the max is per key block
    (not per tile), which needs no reduction across key blocks.
    """
    js = j0 + tl.arange(0, TJ)
    d = tl.arange(0, DP)
    col_ok = js < n_cols
    km = tl.load(kmean_row + js[:, None] * D + d[None, :],
                 mask=col_ok[:, None] & (d < D)[None, :], other=0.0)      # (TJ, DP)
    if IEEE:
        logits = tl.dot(km, qt, input_precision="ieee")
    else:
        logits = tl.dot(km, qt)
    logits = tl.where(col_ok[:, None] & row_ok[None, :], logits * qk_scale, float("-inf"))
    m = tl.max(logits, axis=1)
    # A masked key block has m = -inf; 0 keeps its exps at 0 instead of NaN (its score: -inf).
    m = tl.where(m == float("-inf"), 0.0, m)
    return m + tl.log2(tl.sum(tl.exp2(logits - m[:, None]), axis=1))


@triton.jit
def _pattern_search_kernel(q_ptr, kmean_ptr, num_ptr, idx_ptr,
                           sqb, sqh, sqs, sqd,
                           S, M, H, Hkv, G, qk_scale, log2_alpha,
                           sink_blocks, window_blocks, last_dense_blocks,
                           BLOCK: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                           TJ: tl.constexpr, GROUP: tl.constexpr, GP: tl.constexpr,
                           IEEE: tl.constexpr):
    """One program per (query block i, batch * head unit); a unit is GROUP query heads.

    GROUP = 1: each query head gets its own kept set. GROUP = G: the heads of one kv group get
    the union of their kept sets. Writes kv_num_blocks[b, h, i] and the whole row
    kv_indices[b, h, i, :] of every head of the unit.

    Pass A scores the row once and parks the fp32 log2 scores in the row's own kv_indices
    storage (bit-cast; the row is this program's alone and stays in L2). Pass B reads them back
    tile by tile and compacts the kept indices in place: the index written at position p comes
    from a block j >= p of a tile already read, so no unread score is overwritten.
    """
    # torch.compile may pass Python floats as fp64: keep the arithmetic in fp32.
    qk_scale = tl.cast(qk_scale, tl.float32)
    log2_alpha = tl.cast(log2_alpha, tl.float32)
    # Largest rows first: they hold the most key blocks, so the tail of the launch is short.
    i = M - 1 - tl.program_id(0)
    pid1 = tl.program_id(1)
    units = H // GROUP
    b = (pid1 // units).to(tl.int64)
    h0 = (pid1 % units) * GROUP
    kvh = (h0 // G).to(tl.int64)
    kmean_row = kmean_ptr + (b * Hkv + kvh) * M * D

    rows = i * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < S
    d = tl.arange(0, DP)
    q_offs = rows[:, None].to(tl.int64) * sqs + d[None, :] * sqd
    q_msk = row_ok[:, None] & (d < D)[None, :]
    dense_row = i >= M - last_dense_blocks
    # Dense rows keep every causal block: they are not scored. Folding them into the window
    # (rather than or-ing a scalar into block masks) also dodges an interpreter bug that turns
    # `block_bool | scalar_bool` into an int32 mask.
    n_tiles_a = tl.where(dense_row, 0, (i + TJ - 1) // TJ)
    window_lo = tl.where(dense_row, -1, i - window_blocks)
    scored_hi = tl.where(dense_row, 0, i)   # blocks j < scored_hi have parked scores
    row_out = ((b * H + h0) * M + i) * M

    q_head = q_ptr + b * sqb + h0.to(tl.int64) * sqh + q_offs
    # Pass A: per head, the threshold log2(alpha) + max_j log2 score_ij; scores parked.
    gs = tl.arange(0, GP)
    thr_vec = tl.full([GP], float("-inf"), tl.float32)
    for g in range(GROUP):
        qt = tl.trans(tl.load(q_head + g * sqh, mask=q_msk, other=0.0))
        best = tl.full([], float("-inf"), tl.float32)
        has_nan = tl.zeros([], dtype=tl.int32)
        for t in range(0, n_tiles_a):
            ls = _tile_log2_scores(qt, kmean_row, t * TJ, i, row_ok, qk_scale, D, DP, TJ, IEEE)
            js = t * TJ + tl.arange(0, TJ)
            tl.store(idx_ptr + row_out + g * M * M + js, ls.to(tl.int32, bitcast=True),
                     mask=js < i)
            isnan = ls != ls
            has_nan = tl.maximum(has_nan, tl.max(isnan.to(tl.int32), axis=0))
            best = tl.maximum(best, tl.max(tl.where(isnan, float("-inf"), ls), axis=0))
        # The reference's row max is NaN when any score is: then every block is kept.
        thr = tl.where(has_nan != 0, float("-inf"), log2_alpha + best)
        thr_vec = tl.where(gs == g, thr, thr_vec)
    # Other threads of this program read back what pass A wrote.
    tl.debug_barrier()

    # Pass B: threshold tile by tile and append kept indices, ascending, in place.
    count = tl.zeros([], dtype=tl.int32)
    for t in range(0, (i + TJ) // TJ):
        js = t * TJ + tl.arange(0, TJ)
        keep = (js < sink_blocks) | (js > window_lo)
        scored = js < scored_hi
        for g in range(GROUP):
            bits = tl.load(idx_ptr + row_out + g * M * M + js, mask=scored, other=0)
            ls = bits.to(tl.float32, bitcast=True)
            thr = tl.max(tl.where(gs == g, thr_vec, float("-inf")), axis=0)
            # == ~(ls < thr) of the reference: NaN scores keep their block.
            keep |= ((ls >= thr) | (ls != ls)) & scored
        keep &= js <= i
        # Every thread has read this tile before any thread overwrites it (a tile's values can
        # be replicated across warps, and the prefix sum below need not cross warps).
        tl.debug_barrier()
        flags = keep.to(tl.int32)
        pos = count + tl.cumsum(flags, axis=0) - 1
        for g in range(GROUP):
            tl.store(idx_ptr + row_out + g * M * M + pos, js, mask=keep)
        count += tl.sum(flags, axis=0)

    # Unused entries: 0 (they may still hold parked scores).
    for p0 in range((count // TJ) * TJ, M, TJ):
        ps = p0 + tl.arange(0, TJ)
        zeros = tl.zeros([TJ], dtype=tl.int32)
        for g in range(GROUP):
            tl.store(idx_ptr + row_out + g * M * M + ps, zeros, mask=(ps >= count) & (ps < M))
    for g in range(GROUP):
        tl.store(num_ptr + ((b * H + h0 + g) * M + i), count)


def _launch_config(block_size: int, head_dim_p2: int) -> dict:
    """Tile width in key blocks and launch options (fixed; no autotune, so it also interprets)."""
    if _interpreting():
        # Small tiles so that the CPU tests cross several tiles per row.
        return dict(TJ=16, num_warps=4, num_stages=1)
    # Measured on the H200 at block 128, D 128 (benchmarks/tune_search.py, RESULTS.md run 10):
    # TJ 64 with one warp group and no pipelining was fastest at 32K and 128K.
    tj = 64 if block_size * head_dim_p2 <= 128 * 128 else 32
    return dict(TJ=tj, num_warps=4, num_stages=1)


def pattern_search(q: torch.Tensor, k: torch.Tensor, scale: float, block_size: int, alpha: float,
                   sink_blocks: int, window_blocks: int, last_dense_blocks: int, *,
                   gqa_shared: bool = False, kmean: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashPrefill block selection in FlexAttention's compact layout.

    q (B, H, S, D), k (B, Hkv, S, D), H % Hkv == 0, fp16/bf16/fp32, any strides.
    Returns kv_num_blocks (B, H, M) int32 and kv_indices (B, H, M, M) int32, each row ascending
    and 0 past the count: the same as ``pattern_search_reference``. fp64 runs the reference.
    kmean: optional precomputed ``block_means(k, block_size)`` (any float dtype; cast to q's).
    """
    if q.dtype == torch.float64:
        return pattern_search_reference(q, k, scale, block_size, alpha, sink_blocks,
                                        window_blocks, last_dense_blocks, gqa_shared=gqa_shared)
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    M = (S + block_size - 1) // block_size
    # Key means in q's dtype for 16-bit q (one tensor-core dot; the reference rounds them the
    # same way), fp32 for fp32 q (ieee dot: the reference's selection bit for bit).
    if kmean is None:
        kmean = block_means(k, block_size, out_dtype=q.dtype)
    else:
        kmean = kmean.to(q.dtype).contiguous()
    num = torch.empty((B, H, M), dtype=torch.int32, device=q.device)
    idx = torch.empty((B, H, M, M), dtype=torch.int32, device=q.device)
    group = G if gqa_shared else 1
    DP = max(16, triton.next_power_of_2(int(D)))
    log2_alpha = math.log2(alpha) if alpha > 0 else float("-inf")
    wrap_triton(_pattern_search_kernel)[(M, B * (H // group))](
        q, kmean, num, idx, *q.stride(), S, M, H, Hkv, G, float(scale) * _LOG2E, log2_alpha,
        sink_blocks, window_blocks, last_dense_blocks,
        BLOCK=block_size, D=D, DP=DP, GROUP=group, GP=triton.next_power_of_2(group),
        IEEE=q.dtype == torch.float32, **_launch_config(block_size, DP))
    return num, idx


def pattern_search_reference(q: torch.Tensor, k: torch.Tensor, scale: float, block_size: int,
                             alpha: float, sink_blocks: int, window_blocks: int,
                             last_dense_blocks: int, *, gqa_shared: bool = False):
    """Plain-torch definition of ``pattern_search`` (same arguments and outputs)."""
    keep = ref.select_mask_reference(q, k, scale, block_size, alpha, sink_blocks, window_blocks,
                                     last_dense_blocks, gqa_shared)
    return ref.compact_mask(keep)
