"""Triton pattern search of FlashPrefill: which key blocks each query block keeps.

Computes exactly ``compact_mask(select_mask_reference(...))`` (search_reference.py) without ever
writing a (B, H, M, M) score tensor, sorting or taking a top-k:

* the key-block means come from ``block_means`` (block_means.py).
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
pass B below), instead of scoring every row twice. Interior tiles (every block scored, every row
valid) skip the masks and fold the scale into exp2's argument; running maxima and the mass
guard's sums are kept per tile lane and reduced once per row; the passes that read the parked
scores back take 4 x wider tiles. The device functions live in ``search_tiles``.

Logits accumulate in fp32. For fp16/bf16 q the key means are rounded once to q's dtype
(the reference rounds them the same way); fp32 q uses an ieee fp32 dot, so fp32 selections
equal the reference's bit for bit apart from exact ties.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .block_means import block_means
from .search_tiles import (_full_tile_log2_scores, _guard_offset, _park, _span_row,
                           _tile_log2_scores)
# The reference lives in search_reference.py; its entry points are importable from here too.
from .search_reference import (GUARD_RATIO, GUARD_RUNGS, block_scores_reference,  # noqa: F401
                               check_row_stride, guard_rungs, guarded_choice,
                               pattern_search_reference, select_mask_reference,
                               structural_keep)
from .utils import LOG2E, Span, cdiv, check_kernel_dtype, interpreting, launcher, span_rows


@triton.jit
def _pattern_search_kernel(q_ptr, kmean_ptr, num_ptr, idx_ptr, mass_ptr, p0_ptr, ks_ptr, ke_ptr,
                           col_ptr, diag_ptr, sqb, sqh, sqs, sqd,
                           S, M, H, Hkv, G, qk_scale, log2_alpha, mass_floor, I_LO, I_STEP, NR,
                           sink_blocks, window_blocks, last_dense_blocks,
                           BLOCK: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                           TJ: tl.constexpr, TB: tl.constexpr, GROUP: tl.constexpr,
                           GP: tl.constexpr,
                           IEEE: tl.constexpr, MASS: tl.constexpr, RUNGS: tl.constexpr,
                           RP: tl.constexpr, LOG2_RATIO: tl.constexpr, SPAN: tl.constexpr,
                           VS: tl.constexpr, FULL: tl.constexpr, ROW_STRIDE: tl.constexpr):
    """One program per (query block i, batch * head unit); a unit is GROUP query heads.

    GROUP = 1: each query head gets its own kept set. GROUP = G: the heads of one kv group get
    the union of their kept sets. Writes kv_num_blocks[b, h, i] and the whole row
    kv_indices[b, h, i, :] of every head of the unit.

    Pass A scores the row once and parks the fp32 log2 scores in the row's own kv_indices
    storage (bit-cast; the row is this program's alone and stays in L2). With MASS, pass A2
    reads them back once to weigh the ladder of ``guarded_choice``: the estimated mass each rung
    keeps, all rungs at once (RUNGS of them, RP a power of two >= RUNGS); the row takes the
    first rung that keeps ``mass_floor`` of it and writes that share to mass[b, h, i]. Pass B
    reads the scores back tile by tile and compacts the kept indices in place: the index
    written at position p comes from a block j >= p of a tile already read, so no unread score
    is overwritten.

    SPAN (p0, ks, ke read here; S is then q's length S_q and M counts the key blocks): row r is
    the absolute query block p0 // BLOCK + r (``_span_row``); only the candidate blocks
    [j_lo, j_end) are scored or kept, sinks count from j_lo, and tiles start at j_lo's.

    VS (the vertical/slash detector's flags, (B, H, M) uint8 each at col_ptr / diag_ptr): pass B
    also keeps, for every head of the unit, the blocks j <= i with col[j] or diag[i - j], i the
    absolute query block. They join after the threshold (and the mass, which stays the
    selection's own); with GROUP = G the union then holds every head's flags, the reference's
    order (addition, then union). Pass B's tiles already reach block i, the last flagged one.

    ROW_STRIDE n > 1 (not with SPAN): pass A scores the block with its rows 0, n, 2n, ... only.
    """
    tl.static_assert(ROW_STRIDE == 1 or not SPAN, "a strided search takes no span")
    # torch.compile may pass Python floats as fp64: keep the arithmetic in fp32.
    qk_scale = tl.cast(qk_scale, tl.float32)
    log2_alpha = tl.cast(log2_alpha, tl.float32)
    mass_floor = tl.cast(mass_floor, tl.float32)
    # Rows I_LO, I_LO + I_STEP, ... (NR of them; local row r is i = I_LO + r * I_STEP), largest
    # first: they hold the most key blocks, so the tail of the launch is short.
    r = NR - 1 - tl.program_id(0)
    i = I_LO + r * I_STEP
    pid1 = tl.program_id(1)
    units = H // GROUP
    b = (pid1 // units).to(tl.int64)
    h0 = (pid1 % units) * GROUP
    kvh = (h0 // G).to(tl.int64)
    kmean_row = kmean_ptr + (b * Hkv + kvh) * M * D

    rows = i * BLOCK + tl.arange(0, BLOCK // ROW_STRIDE) * ROW_STRIDE
    row_ok = rows < S
    j_lo = 0
    sink_hi = sink_blocks
    ks_b = 0
    ke_b = S
    if SPAN:
        ks_b = tl.load(ks_ptr + b)
        ke_b = tl.load(ke_ptr + b)
        i, rows, row_ok, span_dense, j_lo, j_end = _span_row(
            p0_ptr, ks_ptr + b, ke_ptr + b, r, S, last_dense_blocks, BLOCK)
        # the first sink_blocks * BLOCK valid keys: one block more when ks is not aligned
        sink_hi = (ks_b + BLOCK - 1) // BLOCK + sink_blocks
    t_lo = j_lo // TJ   # the first tile holding a candidate block
    d = tl.arange(0, DP)
    q_offs = rows[:, None].to(tl.int64) * sqs + d[None, :] * sqd
    q_msk = row_ok[:, None] & (d < D)[None, :]
    dense_row = i >= M - last_dense_blocks
    if SPAN:
        dense_row = span_dense
    # Dense rows keep every causal block: they are not scored. Folding them into the window
    # (rather than or-ing a scalar into block masks) also dodges an interpreter bug that turns
    # `block_bool | scalar_bool` into an int32 mask.
    n_tiles_a = tl.where(dense_row, 0, (i + TJ - 1) // TJ)
    window_lo = tl.where(dense_row, -1, i - window_blocks)
    scored_hi = tl.where(dense_row, 0, i)   # blocks j < scored_hi have parked scores
    score_end = i                           # pass A's tiles score blocks j < score_end
    if SPAN:
        scored_hi = tl.where(dense_row, j_lo, tl.minimum(i, j_end))
        n_tiles_a = tl.where(scored_hi > j_lo, (scored_hi + TJ - 1) // TJ, 0)
        score_end = scored_hi
    # Pass A's interior tiles (t < n_full: every block scored, every row valid) take the
    # unmasked path; the last, partial tile (and every tile with a span, fp32 or FULL off) the
    # masked one.
    n_full = t_lo
    if FULL:
        n_full = tl.where((i + 1) * BLOCK <= S, tl.minimum(score_end // TJ, n_tiles_a), t_lo)
    row_out = ((b * H + h0) * NR + r) * M      # int64: b is
    HEAD = (b * 0 + NR) * M  # one head's rows in num / idx (NR x M), int64; NR may be constexpr 1

    q_head = q_ptr + b * sqb + h0.to(tl.int64) * sqh + q_offs
    # Pass A: per head, the threshold log2(alpha) + max_j log2 score_ij; scores parked.
    gs = tl.arange(0, GP)
    thr_vec = tl.full([GP], float("-inf"), tl.float32)
    for g in range(GROUP):
        qt = tl.trans(tl.load(q_head + g * sqh, mask=q_msk, other=0.0))
        best_v = tl.full([TJ], float("-inf"), tl.float32)
        nan_v = tl.zeros([TJ], dtype=tl.int32)
        for t in range(t_lo, n_full):
            ls = _full_tile_log2_scores(qt, kmean_row, t * TJ, qk_scale, D, DP, TJ)
            best_v, nan_v = _park(idx_ptr + row_out + g * HEAD, ls, t * TJ + tl.arange(0, TJ),
                                  score_end, best_v, nan_v)
        for t in range(n_full, n_tiles_a):
            ls = _tile_log2_scores(qt, kmean_row, t * TJ, j_lo, score_end, row_ok, qk_scale,
                                   ks_b, ke_b, D, DP, TJ, IEEE, SPAN, BLOCK)
            best_v, nan_v = _park(idx_ptr + row_out + g * HEAD, ls, t * TJ + tl.arange(0, TJ),
                                  score_end, best_v, nan_v)
        best = tl.max(best_v, axis=0)
        has_nan = tl.max(nan_v, axis=0)
        offset = log2_alpha
        if MASS:
            offset = _guard_offset(idx_ptr + row_out + g * HEAD, mass_ptr + (
                (b * H + h0 + g) * NR + r), best, has_nan, log2_alpha, mass_floor, j_lo,
                score_end, j_lo // TB, tl.where(n_tiles_a > 0, (score_end + TB - 1) // TB, 0),
                sink_hi, window_lo, TB, RUNGS, RP, LOG2_RATIO, SPAN)
        # The reference's row max is NaN when any score is: then every block is kept.
        thr = tl.where(has_nan != 0, float("-inf"), offset + best)
        thr_vec = tl.where(gs == g, thr, thr_vec)
    # Other threads of this program read back what pass A wrote.
    tl.debug_barrier()

    # Pass B: threshold tile by tile and append kept indices, ascending, in place.
    count = tl.zeros([], dtype=tl.int32)
    b_tiles = (i + TB) // TB
    if SPAN:
        b_tiles = (j_end + TB - 1) // TB
    for t in range(j_lo // TB, b_tiles):
        js = t * TB + tl.arange(0, TB)
        keep = (js < sink_hi) | (js > window_lo)
        scored = js < scored_hi
        if SPAN:
            scored &= js >= j_lo
        for g in range(GROUP):
            bits = tl.load(idx_ptr + row_out + g * HEAD + js, mask=scored, other=0)
            ls = bits.to(tl.float32, bitcast=True)
            thr = tl.max(tl.where(gs == g, thr_vec, float("-inf")), axis=0)
            # == ~(ls < thr) of the reference: NaN scores keep their block.
            keep |= ((ls >= thr) | (ls != ls)) & scored
        if VS:
            causal = js <= i
            for g in range(GROUP):
                vs_row = (b * H + h0 + g) * M      # int64: b is
                col = tl.load(col_ptr + vs_row + js, mask=causal, other=0)
                diag = tl.load(diag_ptr + vs_row + (i - js), mask=causal, other=0)
                keep |= ((col | diag) != 0) & causal
        keep &= js <= i
        if SPAN:
            keep &= (js >= j_lo) & (js < j_end)
        # Every thread has read this tile before any thread overwrites it (a tile's values can
        # be replicated across warps, and the prefix sum below need not cross warps).
        tl.debug_barrier()
        flags = keep.to(tl.int32)
        pos = count + tl.cumsum(flags, axis=0) - 1
        for g in range(GROUP):
            tl.store(idx_ptr + row_out + g * HEAD + pos, js, mask=keep)
        count += tl.sum(flags, axis=0)

    # Unused entries: 0 (they may still hold parked scores).
    for p in range((count // TJ) * TJ, M, TJ):
        ps = p + tl.arange(0, TJ)
        zeros = tl.zeros([TJ], dtype=tl.int32)
        for g in range(GROUP):
            tl.store(idx_ptr + row_out + g * HEAD + ps, zeros, mask=(ps >= count) & (ps < M))
    for g in range(GROUP):
        tl.store(num_ptr + ((b * H + h0 + g) * NR + r), count)


# Pass A's tiles, name -> constexprs: "full" scores interior tiles unmasked
# (``_full_tile_log2_scores``); "masked" scores every tile through the masked path, as before
# that path existed (an A/B control for benchmarks/tune_search.py).
SEARCH_VARIANTS = {"masked": dict(FULL=False), "full": dict(FULL=True)}
SEARCH_VARIANT = "full"


def _variant(name: str | None, q: torch.Tensor, scale: float, span) -> dict:
    """The constexprs of search variant ``name`` (None: SEARCH_VARIANT) for this call: the
    interior path needs 16-bit q (fp32 keeps the reference's ieee arithmetic bit for bit), no
    span and a positive scale (the max is taken before scaling)."""
    name = SEARCH_VARIANT if name is None else name
    if name not in SEARCH_VARIANTS:
        raise ValueError(f"pattern_search: variant must be one of {sorted(SEARCH_VARIANTS)}, "
                         f"got {name!r}")
    flags = dict(SEARCH_VARIANTS[name])
    if q.dtype == torch.float32 or span is not None or not scale > 0:
        flags = dict(SEARCH_VARIANTS["masked"])
    return flags


def _launch_config(block_size: int, head_dim_p2: int) -> dict:
    """Tile widths in key blocks (TJ: pass A's scoring; TB: the mass pass and pass B, which read
    the parked scores) and launch options (fixed; no autotune, so it also interprets)."""
    if interpreting():
        # Small tiles so that the CPU tests cross several tiles per row (TB != TJ on purpose).
        return dict(TJ=16, TB=32, num_warps=4, num_stages=1)
    # Measured on the H200 at block 128, D 128 (benchmarks/tune_search.py, RESULTS.md run 10):
    # TJ 64 with one warp group and no pipelining was fastest at 32K and 128K.
    # The passes that read the parked scores back take 4 x wider tiles (run 51: the guarded
    # search 1.99 -> 1.71 ms at 128K with TB 256).
    tj = 64 if block_size * head_dim_p2 <= 128 * 128 else 32
    return dict(TJ=tj, TB=4 * tj, num_warps=4, num_stages=1)


def _check_span(span: Span, B: int, device) -> None:
    """Shapes, dtypes and device of a span (metadata only: its values stay on the device)."""
    for name, t, shape in (("p0", span.p0, (1,)), ("ks", span.ks, (B,)), ("ke", span.ke, (B,))):
        if t.dtype != torch.int32 or tuple(t.shape) != shape or t.device != device:
            raise ValueError(f"pattern_search: span.{name} must be an int32 {shape} tensor on "
                             f"{device}, got {t.dtype} {tuple(t.shape)} on {t.device}")


_FLAG_DTYPES = (torch.bool, torch.uint8, torch.int8)


def _vs_flags(vs_blocks, B: int, H: int, M: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The vertical/slash flags checked (metadata only) and as contiguous bytes for the kernel
    (a bool tensor is copied to uint8: (B, H, M) bytes)."""
    if not isinstance(vs_blocks, (tuple, list)) or len(vs_blocks) != 2:
        raise ValueError("pattern_search: vs_blocks must be a pair (column_blocks, "
                         f"diagonal_blocks), got {type(vs_blocks).__name__}")
    out = []
    for name, t in zip(("column_blocks", "diagonal_blocks"), vs_blocks):
        if (not isinstance(t, torch.Tensor) or t.dtype not in _FLAG_DTYPES
                or tuple(t.shape) != (B, H, M) or t.device != device):
            got = (f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor)
                   else type(t).__name__)
            raise ValueError(f"pattern_search: vs_blocks {name} must be a bool/uint8/int8 "
                             f"{(B, H, M)} tensor on {device}, got {got}")
        # A copy, not a bit view: Inductor cannot lower a bool -> uint8 view (H200, run 31).
        out.append((t.to(torch.uint8) if t.dtype == torch.bool else t).contiguous())
    return out[0], out[1]


def pattern_search(q: torch.Tensor, k: torch.Tensor, scale: float, block_size: int, alpha: float,
                   sink_blocks: int, window_blocks: int, last_dense_blocks: int, *,
                   gqa_shared: bool = False, kmean: torch.Tensor | None = None,
                   mass_floor: float = 0.0, return_mass: bool = False,
                   rows: tuple[int, int, int] | None = None, span: Span | None = None,
                   vs_blocks: tuple[torch.Tensor, torch.Tensor] | None = None,
                   variant: str | None = None, row_stride: int = 1):
    """FlashPrefill block selection in FlexAttention's compact layout.

    q (B, H, S, D), k (B, Hkv, S, D), H % Hkv == 0, fp16/bf16/fp32, any strides.
    Returns kv_num_blocks (B, H, M) int32 and kv_indices (B, H, M, M) int32, each row ascending
    and 0 past the count: the same as ``pattern_search_reference``.
    kmean: optional precomputed ``block_means(k, block_size)`` (any float dtype; cast to q's).
    mass_floor > 0: the mass guard (``guarded_choice``). return_mass: also return the estimated
    kept mass per row (B, H, M) fp32.
    rows: (start, step, n): only query blocks start, start + step, ..., n of them; the outputs
    then hold those rows in that order: num (B, H, n), idx (B, H, n, M), mass (B, H, n). Memory
    follows n (the dispatch selects long prompts a chunk of rows at a time, and samples rows
    for the dense decision).
    span: ``utils.Span`` (p0, ks, ke on q's device, read only by the kernels): q (B, H, S_q, D)
    sits at key positions p0 .. p0 + S_q - 1 of k (B, Hkv, S, D). The outputs then have
    n = span_rows(S_q, block_size) rows, row t the absolute query block p0 // block_size + t:
    num (B, H, n), idx (B, H, n, M), mass (B, H, n), M = ceil(S / block_size); a given kmean
    must then be ``block_means(k, block_size, span=span)``. Does not combine with ``rows``.
    vs_blocks: (column_blocks, diagonal_blocks), each (B, H, M) bool (or uint8/int8) on q's
    device, from the vertical/slash detector (``vertical_slash_flags``): every query block i
    also keeps the key blocks j <= i with column_blocks[j] or diagonal_blocks[i - j], added
    before the GQA union (``select_mask_reference(..., vertical_slash=True)``), with no dense
    (B, H, M, M) mask in between. The mass is the selection's before that addition. Combines
    with ``rows`` (i stays the absolute block), not with a span (the reference refuses it).
    variant: a key of ``SEARCH_VARIANTS`` (None: ``SEARCH_VARIANT``), for A/B measurements.
    row_stride: n > 1 scores each query block with every n-th of its rows (the config's
    ``search_stride``; ``pattern_search_reference(..., row_stride=n)``); not with a span.
    """
    check_kernel_dtype(q, "pattern_search")
    check_row_stride(row_stride, block_size, span is not None, "pattern_search")
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    M = cdiv(S if span is None else k.shape[2], block_size)
    # Key means in q's dtype for 16-bit q (one tensor-core dot; the reference rounds them the
    # same way), fp32 for fp32 q (ieee dot: the reference's selection bit for bit).
    if kmean is None:
        kmean = block_means(k, block_size, out_dtype=q.dtype, span=span)
    else:
        kmean = kmean.to(q.dtype).contiguous()
    if span is not None and rows is not None:
        raise ValueError("pattern_search: rows= does not combine with a span")
    start, step, n = (0, 1, M) if rows is None else rows
    if rows is not None and (n < 1 or start < 0 or step < 1 or start + (n - 1) * step >= M):
        raise ValueError(f"pattern_search: rows={rows} outside the {M} query blocks")
    if span is not None:
        _check_span(span, B, q.device)
        n = span_rows(S, block_size)
    if vs_blocks is not None and span is not None:
        raise ValueError("pattern_search: vs_blocks (the vertical/slash detector) does not "
                         "combine with a span")
    flags = None if vs_blocks is None else _vs_flags(vs_blocks, B, H, M, q.device)
    num = torch.empty((B, H, n), dtype=torch.int32, device=q.device)
    idx = torch.empty((B, H, n, M), dtype=torch.int32, device=q.device)
    group = G if gqa_shared else 1
    DP = max(16, triton.next_power_of_2(int(D)))
    log2_alpha = math.log2(alpha) if alpha > 0 else float("-inf")
    use_mass = mass_floor > 0 or return_mass
    mass = torch.empty((B, H, n), dtype=torch.float32, device=q.device) if use_mass else num
    p0, ks, ke = (num, num, num) if span is None else span
    col, diag = (num, num) if flags is None else flags
    launcher(_pattern_search_kernel)[(n, B * (H // group))](
        q, kmean, num, idx, mass, p0, ks, ke, col, diag, *q.stride(), S, M, H, Hkv, G,
        float(scale) * LOG2E, log2_alpha, float(mass_floor), start, step, n, sink_blocks,
        window_blocks, last_dense_blocks,
        BLOCK=block_size, D=D, DP=DP, GROUP=group, GP=triton.next_power_of_2(group),
        IEEE=q.dtype == torch.float32, MASS=use_mass, RUNGS=GUARD_RUNGS,
        RP=triton.next_power_of_2(GUARD_RUNGS), LOG2_RATIO=math.log2(GUARD_RATIO),
        SPAN=span is not None, VS=flags is not None, ROW_STRIDE=row_stride,
        **_variant(variant, q, scale, span),
        **_launch_config(block_size, DP))
    return (num, idx, mass) if return_mass else (num, idx)
