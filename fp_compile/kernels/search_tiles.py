"""Device functions of the pattern search (``pattern_search._pattern_search_kernel``): scoring a
tile of key blocks against one query block (masked, or unmasked for interior tiles), parking the
scores, the mass guard's ladder over the parked scores, and the selection row of a call with a
span. They compute pieces of ``search_reference``'s rule; the tests compare the whole kernel
with it.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_log2_scores(qt, kmean_row, j0, j_lo, n_cols, row_ok, qk_scale, ks, ke,
                      D: tl.constexpr, DP: tl.constexpr, TJ: tl.constexpr,
                      IEEE: tl.constexpr, SPAN: tl.constexpr, BLOCK: tl.constexpr):
    """log2 score_ij of key blocks j0 .. j0 + TJ for one query block; -inf for j >= n_cols
    (and, with SPAN, for j < j_lo). With SPAN each score is weighted by the block's share of
    valid keys [ks, ke) (a block of 2 valid keys holds about 2 / BLOCK of a full block's mass;
    without a span every scored block is full).

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
    if SPAN:
        col_ok &= js >= j_lo
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
    ls = m + tl.log2(tl.sum(tl.exp2(logits - m[:, None]), axis=1))
    if SPAN:
        count = tl.minimum(ke, (js + 1) * BLOCK) - tl.maximum(ks, js * BLOCK)
        ls += tl.log2(tl.maximum(count, 1).to(tl.float32) / BLOCK)
    return ls


@triton.jit
def _full_tile_log2_scores(qt, kmean_row, j0, qk_scale, D: tl.constexpr, DP: tl.constexpr,
                           TJ: tl.constexpr):
    """``_tile_log2_scores`` for an interior tile: every key block j0 .. j0 + TJ - 1 scored and
    every query row valid, so no mask; qk_scale > 0 (the host checks), so the max is taken on
    the raw dots and the scale enters exp2's argument as one multiply-add.

    Measured on the H200 and dropped (RESULTS.md run 50): the exponentials in fp16, two per
    instruction (``ex2.approx.f16x2``), were no faster (1.88 vs 1.83 ms at 128K), and their sum
    as a tensor-core dot with a ones matrix was slower (2.13 ms): the tile is not bound by exp.
    """
    js = j0 + tl.arange(0, TJ)
    d = tl.arange(0, DP)
    if DP == D:
        km = tl.load(kmean_row + js[:, None] * D + d[None, :])
    else:
        km = tl.load(kmean_row + js[:, None] * D + d[None, :], mask=(d < D)[None, :],
                     other=0.0)
    raw = tl.dot(km, qt)                                   # (TJ, BLOCK) fp32
    m = tl.max(raw, axis=1) * qk_scale
    return m + tl.log2(tl.sum(tl.exp2(raw * qk_scale - m[:, None]), axis=1))


@triton.jit
def _park(idx_row, ls, js, score_end, best_v, nan_v):
    """Park one tile's log2 scores (bit-cast) in the row's kv_indices storage and fold them
    into the row's running max and NaN flag, kept per tile lane ((TJ,) vectors, reduced once
    after the row: no reduction across warps per tile)."""
    tl.store(idx_row + js, ls.to(tl.int32, bitcast=True), mask=js < score_end)
    isnan = ls != ls
    nan_v = tl.maximum(nan_v, isnan.to(tl.int32))
    best_v = tl.maximum(best_v, tl.where(isnan, float("-inf"), ls))
    return best_v, nan_v


@triton.jit
def _guard_offset(scores_row, mass_out, best, has_nan, log2_alpha, mass_floor, j_lo, score_end,
                  t_lo, n_tiles, sink_hi, window_lo, TB: tl.constexpr, RUNGS: tl.constexpr,
                  RP: tl.constexpr, LOG2_RATIO: tl.constexpr, SPAN: tl.constexpr):
    """The mass guard for one head's row: log2 of the chosen rung's relative threshold.

    scores_row: the row's parked log2 scores (blocks j < score_end, and j >= j_lo with SPAN,
    in tiles of TB blocks t_lo .. n_tiles - 1); best: their max. Rung c keeps
    blocks with log2 score >= best + log2(alpha) + c * LOG2_RATIO, the last rung every block,
    sinks and window always. The weights 2^(ls - best) are the scores normalised by the row's
    best, so the shares equal those of ``guarded_choice``. Writes the chosen rung's kept share
    (1 when nothing is scored or a score is NaN).
    """
    # Pass A's stores must be visible to every thread before they are read back.
    tl.debug_barrier()
    cs = tl.arange(0, RP)
    rel = tl.where(cs < RUNGS - 1, log2_alpha + cs.to(tl.float32) * LOG2_RATIO, float("-inf"))
    # Per tile lane, summed once after the row (no reduction across warps per tile).
    total_v = tl.zeros([TB], dtype=tl.float32)
    kept_v = tl.zeros([TB, RP], dtype=tl.float32)
    for t in range(t_lo, n_tiles):
        js = t * TB + tl.arange(0, TB)
        scored = js < score_end
        if SPAN:
            scored &= js >= j_lo
        ls = tl.load(scores_row + js, mask=scored, other=0).to(tl.float32, bitcast=True)
        w = tl.where(scored & (ls == ls), tl.exp2(ls - best), 0.0)
        always = (js < sink_hi) | (js > window_lo) | (ls != ls)
        passes = (ls[:, None] >= best + rel[None, :]) | always[:, None]
        kept_v += w[:, None] * passes.to(tl.float32)
        total_v += w
    kept = tl.sum(kept_v, axis=0)
    total = tl.sum(total_v, axis=0)
    ok = (kept >= mass_floor * total) | (cs >= RUNGS - 1)
    c_star = tl.min(tl.where(ok, cs, RP), axis=0)
    share = tl.sum(tl.where(cs == c_star, kept, 0.0), axis=0) / tl.maximum(total, 1e-38)
    share = tl.where((total > 0) & (has_nan == 0), share, 1.0)
    tl.store(mass_out, share)
    return tl.max(tl.where(cs == c_star, rel, float("-inf")), axis=0)


@triton.jit
def _span_row(p0_ptr, ks_ptr, ke_ptr, r, S_q, last_dense_blocks, BLOCK: tl.constexpr):
    """Selection row r of a call with a span (utils.Span), read on the device.

    Returns the absolute query block i = p0 // BLOCK + r, its query rows (key position - p0)
    and which of them score it (R: rows of this call that see a key), whether the row is dense
    (i > L - last_dense_blocks) and its candidate key blocks C = [j_lo, j_end): the blocks
    holding a valid key, j <= i; empty when R is or the batch row has no valid key.
    """
    p0 = tl.load(p0_ptr)
    ks = tl.load(ks_ptr)
    ke = tl.load(ke_ptr)
    i = p0 // BLOCK + r
    pos = i * BLOCK + tl.arange(0, BLOCK)
    rows = pos - p0
    row_ok = (rows >= 0) & (rows < S_q) & (pos >= ks)
    live = ((tl.maximum(tl.maximum(i * BLOCK, p0), ks) < tl.minimum(i * BLOCK + BLOCK, p0 + S_q))
            & (ke > ks))
    j_lo = ks // BLOCK
    j_end = tl.where(live, tl.minimum(i, (ke - 1) // BLOCK) + 1, j_lo)
    # The last query block with keys: past the key end (right padding) every block is dense.
    dense_row = i > (tl.minimum(ke, p0 + S_q) - 1) // BLOCK - last_dense_blocks
    return i, rows, row_ok, dense_row, j_lo, j_end
