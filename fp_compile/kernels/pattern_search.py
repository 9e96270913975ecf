"""Triton pattern search of FlashPrefill: which key blocks each query block keeps.

Computes exactly ``reference.compact_mask(reference.select_mask_reference(...))`` without ever
writing a (B, H, M, M) score tensor, sorting or taking a top-k:

* ``_block_means_kernel``: mean key (and value) of every key block, padding excluded.
* ``_pattern_search_kernel``: one program per (batch, query head, query block i) — or per
  (batch, kv head, i) when the heads of a GQA group share one kept set. The program scores its
  row of blocks against the key-block means in tiles of ``TJ`` key blocks, twice:

  1. pass A finds ``max_j log score_ij``;
  2. pass B recomputes each tile, thresholds it and appends the kept block indices to the row
     of ``kv_indices`` through a prefix sum of the keep flags plus a running count, so the row
     comes out ascending; the unused tail of the row is then written with 0.

  Scores live in the log domain: ``log score_ij = m_t + log sum_r exp(l_rj - m_t)`` with m_t
  the max logit of the tile. The reference's shared row max m_i cancels in the relative
  threshold ``score_ij >= alpha * max_j score_ij``, so the log form keeps the same blocks (up
  to rounding at exact ties) with one pass less and no overflow. NaN scores keep their block,
  and a NaN anywhere in a row keeps the whole row, as the reference's ``~(s < alpha * max)``.

Logits accumulate in fp32. For fp16/bf16 q the fp32 key means are split into a high and a low
part in q's dtype, so two tensor-core dots give the fp32 logits to about 2^-16 relative
(a single low-precision dot would move block scores by ~1% and flip borderline blocks).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import reference as ref


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
    tl.store(kmean_ptr + out, k_sum / count, mask=d_ok)
    if HAS_V:
        tl.store(vmean_ptr + out, v_sum / count, mask=d_ok)


def block_means(k: torch.Tensor, block_size: int, v: torch.Tensor | None = None):
    """Mean key (and value) of every key block, padding excluded.

    k, v: (B, Hkv, S, D), any strides, fp16/bf16/fp32. Returns kmean (B, Hkv, M, D) fp32,
    or (kmean, vmean) when v is given; M = ceil(S / block_size).
    """
    B, Hkv, S, D = k.shape
    M = (S + block_size - 1) // block_size
    kmean = torch.empty((B, Hkv, M, D), dtype=torch.float32, device=k.device)
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
def _load_means_tile(hi_ptr, lo_ptr, j0, n_cols,
                     D: tl.constexpr, DP: tl.constexpr, TJ: tl.constexpr, SPLIT: tl.constexpr):
    """Key means of blocks j0 .. j0 + TJ as (DP, TJ) dot operands; 0 for j >= n_cols, d >= D.

    hi_ptr/lo_ptr: this (batch, kv head)'s means (M, D), split in q's dtype when SPLIT, else
    fp32 (then lo is hi and not loaded).
    """
    js = j0 + tl.arange(0, TJ)
    d = tl.arange(0, DP)
    offs = js[None, :] * D + d[:, None]
    msk = (js < n_cols)[None, :] & (d < D)[:, None]
    hi = tl.load(hi_ptr + offs, mask=msk, other=0.0)
    lo = hi
    if SPLIT:
        lo = tl.load(lo_ptr + offs, mask=msk, other=0.0)
    return hi, lo


@triton.jit
def _tile_log_scores(q, hi, lo, j0, n_cols, row_ok, scale,
                     TJ: tl.constexpr, SPLIT: tl.constexpr):
    """log score_ij of key blocks j0 .. j0 + TJ for one query block; -inf for j >= n_cols.

    q: (BLOCK, DP) query rows (padding rows and dims 0); hi, lo from _load_means_tile.
    Returns (TJ,) fp32: m + log sum_r exp(l_rj - m), m the max real logit of the tile.
    """
    if SPLIT:
        logits = tl.dot(q, lo, tl.dot(q, hi))
    else:
        logits = tl.dot(q, hi, input_precision="ieee")
    col_ok = j0 + tl.arange(0, TJ) < n_cols
    logits = tl.where(row_ok[:, None] & col_ok[None, :], logits * scale, float("-inf"))
    m = tl.max(tl.max(logits, axis=1), axis=0)
    # An all-masked tile has m = -inf; 0 keeps its exps at 0 instead of NaN.
    m = tl.where(m == float("-inf"), 0.0, m)
    return m + tl.log(tl.sum(tl.exp(logits - m), axis=0))


@triton.jit
def _pattern_search_kernel(q_ptr, hi_ptr, lo_ptr, num_ptr, idx_ptr,
                           sqb, sqh, sqs, sqd,
                           S, M, H, Hkv, G, scale, log_alpha,
                           sink_blocks, window_blocks, last_dense_blocks,
                           BLOCK: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                           TJ: tl.constexpr, GROUP: tl.constexpr, GP: tl.constexpr,
                           SPLIT: tl.constexpr):
    """One program per (query block i, batch * head unit); a unit is GROUP query heads.

    GROUP = 1: each query head gets its own kept set. GROUP = G: the heads of one kv group get
    the union of their kept sets. Writes kv_num_blocks[b, h, i] and the whole row
    kv_indices[b, h, i, :] of every head of the unit.
    """
    # Largest rows first: they hold the most key blocks, so the tail of the launch is short.
    i = M - 1 - tl.program_id(0)
    pid1 = tl.program_id(1)
    units = H // GROUP
    b = (pid1 // units).to(tl.int64)
    h0 = (pid1 % units) * GROUP
    kvh = (h0 // G).to(tl.int64)
    km_off = (b * Hkv + kvh) * M * D
    hi_row = hi_ptr + km_off
    lo_row = lo_ptr + km_off

    rows = i * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < S
    d = tl.arange(0, DP)
    q_offs = rows[:, None].to(tl.int64) * sqs + d[None, :] * sqd
    q_msk = row_ok[:, None] & (d < D)[None, :]
    dense_row = i >= M - last_dense_blocks
    # Dense rows keep every causal block: no need for the row max. Folding them into the
    # window (rather than or-ing a scalar into block masks) also dodges an interpreter bug
    # that turns `block_bool | scalar_bool` into an int32 mask.
    n_tiles_a = tl.where(dense_row, 0, (i + TJ - 1) // TJ)
    window_lo = tl.where(dense_row, -1, i - window_blocks)

    q_head = q_ptr + b * sqb + h0.to(tl.int64) * sqh + q_offs
    # Pass A: per head, the threshold log(alpha) + max_j log score_ij.
    gs = tl.arange(0, GP)
    thr_vec = tl.full([GP], float("-inf"), tl.float32)
    # With one head per program its query tile stays in registers through both passes.
    q0 = tl.load(q_head, mask=q_msk, other=0.0)
    for g in range(GROUP):
        if GROUP == 1:
            q = q0
        else:
            q = tl.load(q_head + g * sqh, mask=q_msk, other=0.0)
        best = tl.full([], float("-inf"), tl.float32)
        has_nan = tl.zeros([], dtype=tl.int32)
        for t in range(0, n_tiles_a):
            hi, lo = _load_means_tile(hi_row, lo_row, t * TJ, i, D, DP, TJ, SPLIT)
            ls = _tile_log_scores(q, hi, lo, t * TJ, i, row_ok, scale, TJ, SPLIT)
            isnan = ls != ls
            has_nan = tl.maximum(has_nan, tl.max(isnan.to(tl.int32), axis=0))
            best = tl.maximum(best, tl.max(tl.where(isnan, float("-inf"), ls), axis=0))
        # The reference's row max is NaN when any score is: then every block is kept.
        thr = tl.where(has_nan != 0, float("-inf"), log_alpha + best)
        thr_vec = tl.where(gs == g, thr, thr_vec)

    # Pass B: threshold tile by tile and append kept indices, ascending.
    count = tl.zeros([], dtype=tl.int32)
    row_out = ((b * H + h0) * M + i) * M
    for t in range(0, (i + TJ) // TJ):
        js = t * TJ + tl.arange(0, TJ)
        keep = (js < sink_blocks) | (js > window_lo)
        # One load of the key-mean tile serves every head of the unit.
        hi, lo = _load_means_tile(hi_row, lo_row, t * TJ, i, D, DP, TJ, SPLIT)
        for g in range(GROUP):
            if GROUP == 1:
                q = q0
            else:
                q = tl.load(q_head + g * sqh, mask=q_msk, other=0.0)
            ls = _tile_log_scores(q, hi, lo, t * TJ, i, row_ok, scale, TJ, SPLIT)
            thr = tl.max(tl.where(gs == g, thr_vec, float("-inf")), axis=0)
            # == ~(ls < thr) of the reference: NaN scores keep their block.
            keep |= ((ls >= thr) | (ls != ls)) & (js < i)
        keep &= js <= i
        flags = keep.to(tl.int32)
        pos = count + tl.cumsum(flags, axis=0) - 1
        for g in range(GROUP):
            tl.store(idx_ptr + row_out + g * M * M + pos, js, mask=keep)
        count += tl.sum(flags, axis=0)

    # Unused entries: 0. They are exactly the positions >= count, which no store above touched.
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
    tj = 64 if block_size * head_dim_p2 <= 128 * 128 else 32
    return dict(TJ=tj, num_warps=8 if block_size >= 128 else 4, num_stages=2)


def pattern_search(q: torch.Tensor, k: torch.Tensor, scale: float, block_size: int, alpha: float,
                   sink_blocks: int, window_blocks: int, last_dense_blocks: int, *,
                   gqa_shared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashPrefill block selection in FlexAttention's compact layout.

    q (B, H, S, D), k (B, Hkv, S, D), H % Hkv == 0, fp16/bf16/fp32, any strides.
    Returns kv_num_blocks (B, H, M) int32 and kv_indices (B, H, M, M) int32, each row ascending
    and 0 past the count: the same as ``pattern_search_reference``. fp64 runs the reference.
    """
    if q.dtype == torch.float64:
        return pattern_search_reference(q, k, scale, block_size, alpha, sink_blocks,
                                        window_blocks, last_dense_blocks, gqa_shared=gqa_shared)
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    M = (S + block_size - 1) // block_size
    kmean = block_means(k, block_size)
    split = q.dtype != torch.float32
    if split:
        hi = kmean.to(q.dtype)
        lo = (kmean - hi.to(torch.float32)).to(q.dtype)
    else:
        hi = lo = kmean
    num = torch.empty((B, H, M), dtype=torch.int32, device=q.device)
    idx = torch.empty((B, H, M, M), dtype=torch.int32, device=q.device)
    group = G if gqa_shared else 1
    DP = max(16, triton.next_power_of_2(int(D)))
    log_alpha = math.log(alpha) if alpha > 0 else float("-inf")
    wrap_triton(_pattern_search_kernel)[(M, B * (H // group))](
        q, hi, lo, num, idx, *q.stride(), S, M, H, Hkv, G, float(scale), log_alpha,
        sink_blocks, window_blocks, last_dense_blocks,
        BLOCK=block_size, D=D, DP=DP, GROUP=group, GP=triton.next_power_of_2(group),
        SPLIT=split, **_launch_config(block_size, DP))
    return num, idx


def pattern_search_reference(q: torch.Tensor, k: torch.Tensor, scale: float, block_size: int,
                             alpha: float, sink_blocks: int, window_blocks: int,
                             last_dense_blocks: int, *, gqa_shared: bool = False):
    """Plain-torch definition of ``pattern_search`` (same arguments and outputs)."""
    keep = ref.select_mask_reference(q, k, scale, block_size, alpha, sink_blocks, window_blocks,
                                     last_dense_blocks, gqa_shared)
    return ref.compact_mask(keep)
