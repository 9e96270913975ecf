"""Triton block-sparse flash-attention forward of FlashPrefill.

Computes exactly ``block_sparse_attention_reference`` (block_sparse_reference.py): causal softmax attention of
every query row over the key blocks its query block keeps (FlexAttention's compact BlockMask
layout), optionally with FlashPrefill V2's mean correction.

Structure (after Triton's fused-attention tutorial): one program per (batch * query head,
query tile of BLOCK_M rows). A query tile lies inside one selection block i, so all its rows
share one kept list. The program keeps (acc, row max m, row sum l) of an online softmax in
exp2 form (scale * log2(e) folded into one multiply) and walks, in this order:

1. the kept blocks j < i: fully visible and full (only the last block can be partial, and it
   is never before a diagonal), so no masks; one flat loop over (kept entry, BLOCK_N sub-tile)
   whose bound comes from ``kv_num_blocks`` loaded in the kernel (no host sync, CUDA-graph
   safe);
2. the diagonal block, when kept: key sub-tiles that end before the tile's first row without
   masks, then the sub-tiles that cross the tile with the causal and sequence-end masks; key
   sub-tiles after the tile's last row are skipped;
3. with MEAN_CORRECTION, the skipped blocks j < i as one pseudo-token each (logit
   scale * q . kmean_j + log(count_j), value vmean_j), BLOCK_J blocks per step, in the same
   online softmax. The kept mask of a chunk of blocks is rebuilt from the sorted kept list
   with a sliding window of BLOCK_J entries (a chunk can hold at most BLOCK_J kept entries).

With a span (padded batch rows, queries at an offset p0): query tiles are absolute (none
straddles two selection blocks); only the kept blocks not wholly inside the row's valid keys
[ks, ke) (at the two ends of the ascending list, and a diagonal holding a padding bound) take
masks, the others run the unmasked loops; rows that see no key give 0. Optionally each row's log-sum-exp is written (for merging partial results).

Entries of a kept list at or after the diagonal other than the diagonal itself are ignored,
as in the reference. Query head h reads kv head h // (H // Hkv); k and v are never copied.
Dots take q's dtype with fp32 accumulation; fp32 inputs use TF32 only when
``torch.backends.cuda.matmul.allow_tf32`` is set (torch's own rule for matmuls), else IEEE.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_tiles import _kept_split
from .block_means import block_means
# The reference lives in its own module; importing it from here keeps working.
from .block_sparse_reference import (block_sparse_attention_reference,  # noqa: F401
                                     check_span_and_lse, check_span_options)
from .utils import LOG2E, Span, check_kernel_dtype, interpreting, launcher


@triton.jit
def _softmax_update(acc, m_i, l_i, s, v, SAFE: tl.constexpr):
    """One online-softmax step.

    acc (BLOCK_M, DP) fp32, m_i / l_i (BLOCK_M,) fp32 running max / sum (log2 units);
    s (BLOCK_M, BLOCK_N) fp32 logits already scaled to log2 units, -inf where masked;
    v (BLOCK_N, DP) values. SAFE: a row may have seen only -inf so far; subtract 0 instead of
    -inf there so that exp2 gives 0, not NaN.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_sub = m_new
    if SAFE:
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_sub)
    p = tl.math.exp2(s - m_sub[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit
def _visible_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, kv_d_mask, qk_scale,
                  PAD_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key tile that every row of the query tile sees in full (no causal mask)."""
    if PAD_D:
        k = tl.load(k_ptrs, mask=kv_d_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_d_mask, other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    return _softmax_update(acc, m_i, l_i, s, v, False)


@triton.jit
def _masked_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, kv_d_mask, qk_scale, cols, offs_m, lo, hi,
                 CAUSAL: tl.constexpr, SPAN: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key tile with masks: keys cols < hi (and cols >= lo with SPAN) and, with CAUSAL,
    keys at or before the row's position offs_m."""
    col_ok = cols < hi
    if SPAN:
        col_ok = col_ok & (cols >= lo)
    kv_mask = col_ok[:, None] & kv_d_mask
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    visible = col_ok[None, :]
    if CAUSAL:
        visible = (cols[None, :] <= offs_m[:, None]) & visible
    s = tl.where(visible, s, float("-inf"))
    return _softmax_update(acc, m_i, l_i, s, v, True)


@triton.jit
def _edge_tile(acc, m_i, l_i, q, idx_row, t, sin, k_base, v_base, k_tile, v_tile, sks, svs,
               kv_d_mask, qk_scale, offs_n, offs_m, ks, ke, SUB: tl.constexpr,
               BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Sub-tile t % SUB of kept entry t // SUB, before the diagonal, masked to keys [ks, ke)."""
    j = tl.load(idx_row + (t // SUB) * sin)
    start_n = (j * BLOCK_SIZE + (t % SUB) * BLOCK_N).to(tl.int64)
    return _masked_tile(acc, m_i, l_i, q, k_base + start_n * sks + k_tile,
                        v_base + start_n * svs + v_tile, kv_d_mask, qk_scale, start_n + offs_n,
                        offs_m, ks, ke, False, True, DOT_PRECISION)


@triton.jit
def _bsa_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, num_ptr, idx_ptr, kmean_ptr, vmean_ptr,
                    p0_ptr, ks_ptr, ke_ptr, lse_ptr,
                    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                    sob, soh, sos, sod, snb, snh, snm, sib, sih, sim, sin, slb, slh, sls,
                    S, SQ, Q0, H, G, qk_scale,
                    D: tl.constexpr, DP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
                    MEAN_CORRECTION: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    SPAN: tl.constexpr, WRITE_LSE: tl.constexpr):
    """Grid (B * H, cdiv(SQ, BLOCK_M) + SPAN); writes out[b, h, tile rows, :D].

    q (B, H, SQ, D): the queries at sequence positions Q0 .. Q0 + SQ - 1 (Q0 a multiple of
    BLOCK_SIZE), k / v (B, H // G, S, D), out (B, H, SQ, D), any strides;
    num (B, H, n) and idx (B, H, n, M) int32 for query blocks Q0 // BLOCK_SIZE onwards (strides
    may be 0 to broadcast);
    kmean / vmean contiguous (B, H // G, M, D), read only with MEAN_CORRECTION.
    SPAN: the queries sit at p0 .. p0 + SQ - 1 instead (p0 = *p0_ptr, any int, Q0 unused) and
    key j is valid for batch row b iff ks[b] <= j < ke[b] (int32 (B,) at ks_ptr / ke_ptr);
    query tiles are absolute (tile t starts at (p0 // BLOCK_M + t) * BLOCK_M, so none
    straddles two selection blocks) and rows outside the call are neither loaded nor stored;
    rows that see no key write 0. Selection row t is query block p0 // BLOCK_SIZE + t.
    WRITE_LSE: lse (B, H, SQ) fp32 at lse_ptr gets each row's natural-log LSE (-inf if none).
    """
    tl.static_assert(BLOCK_SIZE % BLOCK_M == 0, "a query tile must lie in one selection block")
    tl.static_assert(BLOCK_SIZE % BLOCK_N == 0, "a key tile must lie in one selection block")
    tl.static_assert(DP >= D)
    SUB: tl.constexpr = BLOCK_SIZE // BLOCK_N
    PAD_D: tl.constexpr = DP != D

    # torch.compile may pass Python floats as fp64: keep the arithmetic in fp32.
    qk_scale = tl.cast(qk_scale, tl.float32)
    pid_bh = tl.program_id(0)
    # Last query tiles first: they keep the most blocks (last_dense rows keep them all), so
    # starting them first shortens the tail of the launch.
    tile = tl.num_programs(1) - 1 - tl.program_id(1)
    if SPAN:
        q0 = tl.load(p0_ptr)
        start_m = (q0 // BLOCK_M + tile) * BLOCK_M    # first row, absolute
        start_l = start_m - q0                         # ... and local (< 0 in the first tile)
    else:
        q0 = Q0
        start_l = tile * BLOCK_M
        start_m = Q0 + start_l
    i = start_m // BLOCK_SIZE
    li = i - q0 // BLOCK_SIZE                                             # row of num / idx
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    kvh = h // G

    offs_l = start_l + tl.arange(0, BLOCK_M)
    offs_m = q0 + offs_l
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DP)
    d_ok = offs_d < D
    row_ok = offs_l < SQ
    if SPAN:
        row_ok = row_ok & (offs_l >= 0)
    q_mask = row_ok[:, None] & d_ok[None, :]
    ks = 0
    ke = S
    load_mask = q_mask
    if SPAN:
        ks = tl.load(ks_ptr + b)
        ke = tl.minimum(tl.load(ke_ptr + b), S)
        # Rows before the first valid key see none (left padding): their q is never read.
        load_mask = q_mask & (offs_m >= ks)[:, None]
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_l[:, None].to(tl.int64) * sqs
                + offs_d[None, :] * sqd, mask=load_mask, other=0.0)
    k_base = k_ptr + b * skb + kvh * skh
    v_base = v_ptr + b * svb + kvh * svh
    k_tile = offs_n[:, None] * sks + offs_d[None, :] * skd  # (BLOCK_N, DP)
    v_tile = offs_n[:, None] * svs + offs_d[None, :] * svd
    kv_d_mask = d_ok[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DP], dtype=tl.float32)

    num = tl.load(num_ptr + b * snb + h * snh + li * snm)
    if SPAN:
        num = tl.where(start_m < q0 + SQ, num, 0)  # the last tile may hold no row of the call
    idx_row = idx_ptr + b * sib + h * sih + li.to(tl.int64) * sim
    n_full, diag = _kept_split(idx_row, sin, num, i)   # entries before the diagonal; is it kept

    # 1. Kept blocks before the diagonal: full and fully visible. With a span, the entries at
    # either end of the ascending list whose block is not wholly inside [ks, ke) (a padding
    # start or end inside it) take masks; the rest run the same unmasked loop as without one
    # (no branch in the loop body, which would stop Triton pipelining its loads).
    t_lo = 0
    t_hi = n_full
    if SPAN:
        first_full = tl.cdiv(ks, BLOCK_SIZE)     # blocks j >= it start at or after ks
        end_full = ke // BLOCK_SIZE               # blocks j < it end at or before ke
        j_edge = tl.load(idx_row, mask=n_full > 0, other=first_full)
        while j_edge < first_full:
            t_lo += 1
            j_edge = tl.load(idx_row + t_lo * sin, mask=t_lo < n_full, other=first_full)
        j_edge = tl.load(idx_row + (t_hi - 1) * sin, mask=t_hi > t_lo, other=-1)
        while j_edge >= end_full:
            t_hi -= 1
            j_edge = tl.load(idx_row + (t_hi - 1) * sin, mask=t_hi > t_lo, other=-1)
        for t in range(0, t_lo * SUB):
            acc, m_i, l_i = _edge_tile(acc, m_i, l_i, q, idx_row, t, sin, k_base, v_base, k_tile,
                                       v_tile, sks, svs, kv_d_mask, qk_scale, offs_n, offs_m,
                                       ks, ke, SUB, BLOCK_SIZE, BLOCK_N, DOT_PRECISION)
        for t in range(t_hi * SUB, n_full * SUB):
            acc, m_i, l_i = _edge_tile(acc, m_i, l_i, q, idx_row, t, sin, k_base, v_base, k_tile,
                                       v_tile, sks, svs, kv_d_mask, qk_scale, offs_n, offs_m,
                                       ks, ke, SUB, BLOCK_SIZE, BLOCK_N, DOT_PRECISION)
    for t in range(t_lo * SUB, t_hi * SUB):
        j = tl.load(idx_row + (t // SUB) * sin)
        start_n = (j * BLOCK_SIZE + (t % SUB) * BLOCK_N).to(tl.int64)
        acc, m_i, l_i = _visible_tile(acc, m_i, l_i, q, k_base + start_n * sks + k_tile,
                                      v_base + start_n * svs + v_tile, kv_d_mask, qk_scale,
                                      PAD_D, DOT_PRECISION)

    # 2. The diagonal block, if kept.
    # int64 bounds make the loop variables (key offsets) int64 when compiled.
    diag_lo = i.to(tl.int64) * BLOCK_SIZE
    # Key sub-tiles ending at or before start_m are fully visible; the rest up to the tile's
    # last row (or S) need the causal / sequence-end mask; later sub-tiles see nothing.
    mask_lo = diag_lo + ((start_m - diag_lo) // BLOCK_N) * BLOCK_N
    if SPAN:
        # A padding start in the block, or an end before mask_lo: masks on every sub-tile.
        mask_lo = tl.where((diag_lo < ks) | (ke < mask_lo), diag_lo, mask_lo)
    diag_hi = tl.where(diag, tl.minimum(start_m + BLOCK_M, S), diag_lo)
    open_hi = tl.where(diag, mask_lo, diag_lo)
    for start_n in range(diag_lo, open_hi, BLOCK_N):
        acc, m_i, l_i = _visible_tile(acc, m_i, l_i, q, k_base + start_n * sks + k_tile,
                                      v_base + start_n * svs + v_tile, kv_d_mask, qk_scale,
                                      PAD_D, DOT_PRECISION)
    for start_n in range(mask_lo, diag_hi, BLOCK_N):
        acc, m_i, l_i = _masked_tile(acc, m_i, l_i, q, k_base + start_n * sks + k_tile,
                                     v_base + start_n * svs + v_tile, kv_d_mask, qk_scale,
                                     start_n + offs_n, offs_m, ks, ke, True, SPAN,
                                     DOT_PRECISION)

    # 3. Mean correction: every skipped block j < i as one pseudo-token.
    if MEAN_CORRECTION:
        M = tl.cdiv(S, BLOCK_SIZE)
        mean_base = (b * (H // G) + kvh) * M * D
        offs_j = tl.arange(0, BLOCK_J)
        md_tile = offs_j[:, None] * D + offs_d[None, :]
        pos = tl.zeros([], dtype=tl.int32)  # first kept entry not yet matched to a chunk
        for j0 in range(0, i, BLOCK_J):
            js = j0 + offs_j
            window = pos + offs_j
            ent = tl.load(idx_row + window * sin, mask=window < n_full, other=-1)
            kept = tl.max((ent[None, :] == js[:, None]).to(tl.int32), axis=1) != 0
            pos += tl.sum(((ent >= 0) & (ent < j0 + BLOCK_J)).to(tl.int32), axis=0)
            skipped = (js < i) & ~kept
            m_mask = (js < i)[:, None] & d_ok[None, :]
            km = tl.load(kmean_ptr + mean_base + j0 * D + md_tile, mask=m_mask, other=0.0)
            vm = tl.load(vmean_ptr + mean_base + j0 * D + md_tile, mask=m_mask, other=0.0)
            count = tl.minimum(S - js * BLOCK_SIZE, BLOCK_SIZE).to(tl.float32)
            s = tl.dot(q, tl.trans(km.to(q.dtype)), input_precision=DOT_PRECISION) * qk_scale
            # log(count) in log2 units; masked where the block is kept or not before i.
            s = tl.where(skipped[None, :], s + tl.log2(tl.maximum(count, 1.0))[None, :],
                         float("-inf"))
            acc, m_i, l_i = _softmax_update(acc, m_i, l_i, s, vm.to(q.dtype), True)

    if WRITE_LSE:
        # m_i and l_i are in log2 units (qk_scale holds log2(e)); times ln(2) for natural log.
        # A row that saw nothing has m_i = -inf and l_i = 0: log2(1) keeps its -inf.
        lse = (m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))) * 0.6931471805599453
        tl.store(lse_ptr + b * slb + h * slh + offs_l.to(tl.int64) * sls, lse, mask=row_ok)
    # Rows that saw nothing (no kept block) get 0 / 0 = NaN, as the reference's softmax; with
    # a span they get 0 (their acc is 0: divide by 1).
    if SPAN:
        l_i = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_i[:, None]
    tl.store(o_ptr + b * sob + h * soh + offs_l[:, None].to(tl.int64) * sos
             + offs_d[None, :] * sod, out.to(o_ptr.dtype.element_ty), mask=q_mask)


# GPU configs (BLOCK_M, BLOCK_N, num_warps, num_stages). Checked with ptxas for sm_90
# (Triton 3.6): the 16-bit ones do not spill registers at D <= 128 and fit the H200's 227 KiB
# of shared memory; 128-row tiles need 8 warps (4 spill at D = 128). fp32 tiles take twice
# the shared memory, hence their own (smaller) lists; fp32 is not the fast path.
# 16-bit, D <= 128 (the fast path): the first that fits the selection block is the only one
# launched, so nothing is autotuned (the second serves blocks of 64). Timed on the H200 at
# 8K-128K on planted and random inputs (benchmarks/tune_attention.py, RESULTS.md run 25), it
# was the fastest in 5 of 6 cases and within 3% in the sixth; the six others it replaces were
# up to 2x slower, and the autotuner (keyed on D and block size only) kept whichever won the
# first call for every length after it (a 64-row tile picked at 8K ran 28% slower at 128K).
_TILES = {
    (2, 128): [(128, 128, 8, 3), (64, 64, 4, 3)],
    (2, 256): [(128, 64, 8, 2), (128, 32, 8, 2), (128, 32, 8, 3), (64, 64, 8, 2)],
    (4, 128): [(128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2)],
    (4, 256): [(64, 32, 8, 2), (64, 32, 4, 2)],
}


def _gpu_tiles(block_size: int, head_dim_p2: int, elt_bytes: int):
    """The GPU configs for this (dtype size, D) whose tiles lie inside one selection block."""
    tiles = _TILES[(min(elt_bytes, 4), 128 if head_dim_p2 <= 128 else 256)]
    fit = [t for t in tiles if t[0] <= block_size and t[1] <= block_size]
    # Selection blocks of 16 or 32 tokens: one tile per block.
    return fit or [(block_size, block_size, 4, 2), (block_size, block_size, 4, 3)]


def capture_tile(q: torch.Tensor, block_size: int) -> tuple[int, int, int, int]:
    """A fixed launch config for calls made while a CUDA graph is captured, where the
    autotuner must not run (it would launch and time its candidates inside the capture)."""
    DP = max(16, triton.next_power_of_2(int(q.shape[-1])))
    return _gpu_tiles(block_size, DP, q.element_size())[0]


def _block_j(head_dim_p2: int) -> int:
    """Key blocks per mean-correction step (16 when interpreting, so tests cross chunks)."""
    return 16 if interpreting() or head_dim_p2 > 128 else 32


def _autotune_key(block_size: int, head_dim_p2: int, elt_bytes: int) -> tuple[int, int, int]:
    """Inputs with equal keys have the same candidate list (see _gpu_tiles)."""
    return min(block_size, 128), 128 if head_dim_p2 <= 128 else 256, min(elt_bytes, 4)


def _fixed_tile(block_size: int, head_dim_p2: int, elt_bytes: int):
    """The one launch config of the 16-bit D <= 128 fast path (the measured best that fits the
    block, see _TILES), launched without an autotuner: Triton's Autotuner costs host time per
    call even with one candidate (the opaque op launches from Python). None elsewhere."""
    key = _autotune_key(block_size, head_dim_p2, elt_bytes)
    return _gpu_tiles(*key)[0] if key[1:] == (128, 2) else None


def _make_autotuned(key: tuple[int, int, int]):
    tiles = _gpu_tiles(*key)
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
               for bm, bn, w, s in tiles]
    return triton.autotune(configs=configs, key=["D", "BLOCK_SIZE"])(_bsa_fwd_kernel)


# One autotuner per candidate list (none where _fixed_tile serves), built at import: building
# one while torch.compile traces the launch would make dynamo trace its constructor.
_AUTOTUNED = {(bs, dp, eb): _make_autotuned((bs, dp, eb))
              for bs in (16, 32, 64, 128) for dp in (128, 256) for eb in (2, 4)
              if (dp, eb) != (128, 2)}


def _autotuned_kernel(block_size: int, head_dim_p2: int, elt_bytes: int):
    """The autotuned kernel whose candidates fit this block size, head dim and dtype size."""
    key = _autotune_key(block_size, head_dim_p2, elt_bytes)
    if key not in _AUTOTUNED:  # block sizes below 16 (the config allows none)
        _AUTOTUNED[key] = _make_autotuned(key)
    return _AUTOTUNED[key]


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
                           scale: float, block_size: int, *, mean_correction: bool = False,
                           kmean: torch.Tensor | None = None, vmean: torch.Tensor | None = None,
                           tile: tuple[int, int, int, int] | None = None,
                           out: torch.Tensor | None = None, q_start: int = 0,
                           span: Span | None = None, lse: torch.Tensor | None = None
                           ) -> torch.Tensor:
    """Causal attention over the kept key blocks. Returns (B, H, S, D) in q's dtype.

    q (B, H, S, D); k, v (B, Hkv, S, D), H % Hkv == 0; any strides; fp16/bf16/fp32 (other
    dtypes go to the reference, which the dispatch chooses). kv_num_blocks (B, H, M) int32, kv_indices (B, H, M, M) int32, M =
    ceil(S / block_size): each row's first kv_num_blocks entries are its kept key blocks,
    ascending. mean_correction: skipped blocks before the diagonal enter as pseudo-tokens;
    kmean / vmean (B, Hkv, M, D) block means (computed here when None).
    tile: (BLOCK_M, BLOCK_N, num_warps, num_stages) to bypass autotuning (benchmarks, tests).
    out: optional (B, H, S, D) buffer of q's dtype, any strides, written in full and returned.
    q_start: q holds only the queries at positions q_start .. q_start + S_q - 1 of the
    sequence (q_start a multiple of block_size; out is then (B, H, S_q, D)) and kv_num_blocks /
    kv_indices only their query blocks' rows, (B, H, ceil(S_q / block_size)[, M]).
    span: q (B, H, S_q, D) sits at positions p0 .. p0 + S_q - 1 (any p0, read on the device
    only) and key j is visible to row r of batch row b iff ks[b] <= j < ke[b] and
    j <= p0 + r (``utils.span_visible``); the selection has ``span_rows(S_q, block_size)`` rows,
    row t for query block p0 // block_size + t. Rows that see no key give 0. Not with
    q_start or mean_correction.
    lse: optional fp32 (B, H, S_q) buffer; gets each row's natural-log log-sum-exp of
    scale * q . k over its visible kept keys (-inf where none). Not with mean_correction.
    """
    check_kernel_dtype(q, "block_sparse_attention")
    check_span_options("block_sparse_attention", mean_correction, lse is not None, span,
                       q_start)
    B, H, SQ, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    check_span_and_lse(span, lse, q, kv_num_blocks, block_size)
    if q_start and (q_start % block_size or q_start + SQ > S):
        raise ValueError(f"block_sparse_attention: q_start={q_start} must be a multiple of "
                         f"block_size={block_size} with q_start + S_q <= S_kv={S}")
    if mean_correction:
        if kmean is None or vmean is None:
            kmean, vmean = block_means(k, block_size, v)
        kmean = kmean.to(torch.float32).contiguous()
        vmean = vmean.to(torch.float32).contiguous()
    else:
        kmean = vmean = q  # never read
    if out is None:
        out = q.new_empty(q.shape)  # no fill: the kernel writes every element
    DP = max(16, triton.next_power_of_2(int(D)))
    precision = "ieee"
    if q.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32:
        precision = "tf32"  # the default; only fp32 operands care
    p0, ks, ke = (q, q, q) if span is None else span  # q: never read
    args = (q, k, v, out, kv_num_blocks, kv_indices, kmean, vmean,
            p0, ks, ke, q if lse is None else lse,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            *kv_num_blocks.stride(), *kv_indices.stride(),
            *((0, 0, 0) if lse is None else lse.stride()),
            S, SQ, q_start, H, H // Hkv, float(scale) * LOG2E)
    consts = dict(D=D, DP=DP, BLOCK_SIZE=block_size, BLOCK_J=_block_j(DP),
                  MEAN_CORRECTION=bool(mean_correction), DOT_PRECISION=precision,
                  SPAN=span is not None, WRITE_LSE=lse is not None)
    extra_tile = int(span is not None)  # p0 need not sit on a tile boundary
    if tile is None and interpreting():
        # Autotune cannot run without a GPU; small tiles keep the interpreter quick.
        bm = min(block_size, 32)
        tile = (bm, bm, 4, 1)
    if tile is None:
        tile = _fixed_tile(block_size, DP, q.element_size())
    if tile is not None:
        bm, bn, warps, stages = tile
        grid = (B * H, triton.cdiv(SQ, bm) + extra_tile)
        launcher(_bsa_fwd_kernel)[grid](*args, BLOCK_M=bm, BLOCK_N=bn, **consts,
                                           num_warps=warps, num_stages=stages)
        return out

    # Heads on axis 0 so that the first wave of programs holds every head's heaviest (last)
    # query tiles; the kernel reverses axis 1. S and H may be SymInts under torch.compile.
    def grid(meta):
        return (B * H, triton.cdiv(SQ, meta["BLOCK_M"]) + extra_tile)

    launcher(_autotuned_kernel(block_size, DP, q.element_size()))[grid](*args, **consts)
    return out
