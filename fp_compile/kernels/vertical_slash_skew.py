"""The vertical/slash probe's shared pieces and its "skew" variant (issue 14).

Shared with the "gather" variant in ``vertical_slash``: the probe rows and their logits against a
key tile (``probe_rows``, ``probe_logits``), the sizes of a probe (``probe_shape``) and the first
pass, the probe rows' log-sum-exp over key tiles split across programs (``lse_partials``).

The "skew" variant (``skew_scores``) has three launches and no torch op between them. Its
programs pack the query heads of one kv group (``packing``: GP heads, at most 128 rows in all)
into one row tile, so each key tile (BN keys) is loaded once for them:

1. the LSE partials, (B * H // GP, splits) programs, each over a run of key tiles;
2. the scores, the same programs: each combines the LSE partials itself, keeps its q rows in
   registers and loops over its run of key tiles. Per tile: the softmax p, each head's column
   sums (stored), and each head's diagonal sums of the excess x = p - column. The diagonals
   become columns through a per-program global scratch: x (GP * NP, BN) is written row-major
   (coalesced) and read back with a row pitch of BN + 1, which puts a head's x[r, n] at column
   c = n - r + NP - 1 of a (NP, 2 * BN) view, masked to the entries written, and summed over
   rows (first R // 2 rows and the others apart). The two (2 * BN,) sums of a head's tile are
   stored to its own slot: no atomics, no zeroing;
3. the finalisation, (B * H, M) programs: offset o collects its (at most two) tiles' sums, the
   diagonal score is the smaller half's mean, and with a threshold the block flags of
   ``flags_from_scores`` come out of the same program (the flags of block m need the heavy
   offsets of blocks m and m - 1, both computed here).

The probe rows are the last query block's (R of them, padded to NP) or, with ``n_rows``, the
prompt's last n_rows rows. The scratch holds (B * H // GP) * splits slots of two (GP * NP, BN)
fp32 halves (128 KiB at 128 x 128), with a few programs per SM (``programs_per_sm``); a slot
belongs to one program for its run.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .utils import LOG2E, cdiv, interpreting, launcher


class ProbeShape(NamedTuple):
    """Sizes of a probe: q (B, H, S, D), k (B, Hkv, S, D); M blocks of block_size, the last one
    holding R probe rows (or the prompt's last R rows); BLOCK (power of two >= R) the padded
    rows (and the gather variant's keys per tile), DP the padded head dim, tiles = cdiv(S,
    BLOCK) key tiles of the gather variant."""
    B: int
    H: int
    Hkv: int
    S: int
    D: int
    M: int
    R: int
    BLOCK: int
    DP: int
    tiles: int
    precision: str
    strides: tuple


def probe_shape(q: torch.Tensor, k: torch.Tensor, block_size: int,
                n_rows: int | None = None) -> ProbeShape:
    """n_rows: the prompt's last n_rows rows (at most S) as the probe rows; None: the last query
    block's rows."""
    B, H, S, D = q.shape
    M = cdiv(S, block_size)
    R = S - (M - 1) * block_size if n_rows is None else min(int(n_rows), S)
    BLOCK = max(16, triton.next_power_of_2(R))
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    return ProbeShape(B, H, k.shape[1], S, D, M, R, BLOCK, max(16, triton.next_power_of_2(D)),
                      cdiv(S, BLOCK), precision, (*q.stride(), *k.stride()))


def launch_options(shape: ProbeShape, num_warps: int | None) -> dict:
    if interpreting():
        return {}
    return dict(num_warps=num_warps or (8 if shape.BLOCK * shape.DP >= 128 * 128 else 4))


@triton.jit
def probe_keys(k_ptr, s0, offs_n, offs_d, end, sks, skd, D: tl.constexpr):
    """The key tile s0 + offs_n (BLOCK, DP), zero from key ``end`` (S or less) on and past the
    head dim."""
    cols = s0 + offs_n
    return tl.load(k_ptr + cols[:, None].to(tl.int64) * sks + offs_d[None, :] * skd,
                   mask=(cols < end)[:, None] & (offs_d < D)[None, :], other=0.0)


@triton.jit
def tile_logits(q, k, s0, offs_n, rows, row_ok, S, qk_scale, DOT_PRECISION: tl.constexpr):
    """log2-unit logits of the probe rows against the key tile k (keys s0 + offs_n); -inf
    where not visible."""
    cols = s0 + offs_n
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    visible = row_ok[:, None] & (cols[None, :] <= rows[:, None]) & (cols < S)[None, :]
    return tl.where(visible, s, float("-inf")), visible


@triton.jit
def probe_logits(q, k_ptr, s0, offs_n, offs_d, rows, row_ok, S, sks, skd, qk_scale,
                 D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """log2-unit logits of the probe rows against keys s0 + offs_n; -inf where not visible."""
    k = probe_keys(k_ptr, s0, offs_n, offs_d, S, sks, skd, D)
    return tile_logits(q, k, s0, offs_n, rows, row_ok, S, qk_scale, DOT_PRECISION)


@triton.jit
def probe_rows(q_ptr, k_ptr, grp, sqb, sqh, sqs, sqd, skb, skh, S, R, H, G,
               D: tl.constexpr, DP: tl.constexpr, NP: tl.constexpr, GP: tl.constexpr):
    """The packed probe rows of program group grp: GP query heads of one kv head (heads
    h0 .. h0 + GP - 1, h0 = (grp % (H // GP)) * GP, GP dividing G), NP (padded) rows each, the
    q rows S - R .. S - 1 of every head: q (GP * NP, DP), padding 0, packed row i = g * NP + r.
    Returns q, k_ptr moved to the kv head, the packed row offsets, the rows' positions and
    validity, and b * H + h0 (the first head's (batch * head) index)."""
    b = grp // (H // GP)
    h0 = (grp % (H // GP)) * GP
    offs_i = tl.arange(0, GP * NP)
    offs_d = tl.arange(0, DP)
    r = offs_i % NP
    rows = S - R + r
    row_ok = r < R
    heads = h0 + offs_i // NP
    q = tl.load(q_ptr + b.to(tl.int64) * sqb + heads[:, None].to(tl.int64) * sqh
                + rows[:, None].to(tl.int64) * sqs + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    k_ptr += b.to(tl.int64) * skb + (h0 // G) * skh
    return q, k_ptr, offs_i, rows, row_ok, b * H + h0


@triton.jit
def _probe_lse_kernel(q_ptr, k_ptr, m_ptr, l_ptr, sqb, sqh, sqs, sqd, skb, skh, sks, skd,
                      S, R, H, G, TILES, qk_scale,
                      D: tl.constexpr, DP: tl.constexpr, NP: tl.constexpr, GP: tl.constexpr,
                      BN: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid (B * H // GP, splits): the packed probe rows' running max / sum (log2 units) over
    key tiles (BN keys) split * TILES .. + TILES; m, l (B * H // GP, splits, GP * NP) fp32."""
    qk_scale = tl.cast(qk_scale, tl.float32)   # torch.compile may pass an fp64
    grp = tl.program_id(0)
    split = tl.program_id(1)
    q, k_ptr, offs_i, rows, row_ok, bh0 = probe_rows(
        q_ptr, k_ptr, grp, sqb, sqh, sqs, sqd, skb, skh, S, R, H, G, D, DP, NP, GP)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, DP)
    m_i = tl.full([GP * NP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP * NP], tl.float32)
    for t in range(split * TILES, tl.minimum(split * TILES + TILES, tl.cdiv(S, BN))):
        s, visible = probe_logits(q, k_ptr, t * BN, offs_n, offs_d, rows, row_ok, S, sks,
                                  skd, qk_scale, D, DOT_PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.math.exp2(m_i - m_sub) + tl.sum(tl.math.exp2(s - m_sub[:, None]), 1)
        m_i = m_new
    out = (grp * tl.num_programs(1) + split) * (GP * NP) + offs_i
    tl.store(m_ptr + out, m_i)
    tl.store(l_ptr + out, l_i)


def split_tiles(tiles: int, splits: int) -> tuple[int, int]:
    """(tiles per split, splits) for about ``splits`` runs of key tiles, none empty."""
    per_split = max(1, cdiv(tiles, max(1, splits)))
    return per_split, cdiv(tiles, per_split)


def lse_partials(q: torch.Tensor, k: torch.Tensor, shape: ProbeShape, qk_scale: float,
                 per_split: int, splits: int, opts: dict, packed: int = 1,
                 keys: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first pass: running max m and sum l (log2 units) of the probe rows over each run of
    ``per_split`` key tiles of ``keys`` keys (default BLOCK), each (B * H // packed, splits,
    packed * BLOCK) fp32: ``packed`` query heads of a kv head per program."""
    m = torch.empty(shape.B * shape.H // packed, splits, packed * shape.BLOCK,
                    dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    launcher(_probe_lse_kernel)[(shape.B * shape.H // packed, splits)](
        q, k, m, l, *shape.strides, shape.S, shape.R, shape.H, shape.H // shape.Hkv, per_split,
        qk_scale, D=shape.D, DP=shape.DP, NP=shape.BLOCK, GP=packed, BN=keys or shape.BLOCK,
        DOT_PRECISION=shape.precision, **opts)
    return m, l


# ------------------------------------------------------------------------ the skew variant

@triton.jit
def _skew_scores_kernel(q_ptr, k_ptr, m_ptr, l_ptr, col_ptr, first_ptr, second_ptr, scr_ptr,
                        sqb, sqh, sqs, sqd, skb, skh, sks, skd, S, R, H, G, TILES, qk_scale,
                        D: tl.constexpr, DP: tl.constexpr, NP: tl.constexpr, GP: tl.constexpr,
                        BN: tl.constexpr, SPLITS_P: tl.constexpr, ROWS: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, DIAGONALS: tl.constexpr):
    """Grid (B * H // GP, splits), as the LSE pass: GP query heads of one kv head packed into
    one (GP * NP) row tile against key tiles of BN keys. column (B * H, S): mean over a head's
    probe rows of p; first / second (B * H, tiles, 2 * BN): per tile, at c = n - r + NP - 1
    (offset o = S - R + NP - 1 - s0 - c), the head's excess x[r, n] summed over its first R // 2
    rows and over the others; scr (B * H // GP * splits, 2, GP * NP, BN) fp32, a slot per
    program."""
    qk_scale = tl.cast(qk_scale, tl.float32)
    grp = tl.program_id(0)
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    q, k_ptr, offs_i, rows, row_ok, bh0 = probe_rows(
        q_ptr, k_ptr, grp, sqb, sqh, sqs, sqd, skb, skh, S, R, H, G, D, DP, NP, GP)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, DP)
    offs_g = tl.arange(0, GP)
    # the LSE partials' combine, as the gather variant's torch ops do it
    offs_p = tl.arange(0, SPLITS_P)
    part = (grp * n_split + offs_p[:, None]) * (GP * NP) + offs_i[None, :]
    m = tl.load(m_ptr + part, mask=(offs_p < n_split)[:, None], other=float("-inf"))
    l = tl.load(l_ptr + part, mask=(offs_p < n_split)[:, None], other=0.0)
    m_max = tl.max(m, 0)
    m_sub = tl.where(m_max == float("-inf"), 0.0, m_max)
    lse = m_sub + tl.math.log2(tl.sum(l * tl.math.exp2(m - m_sub[None, :]), 0))

    tiles = tl.cdiv(S, BN)
    out = (bh0 + offs_g).to(tl.int64)[:, None] * S                # (GP, 1): each head's row
    offs_c = tl.arange(0, 2 * BN)
    scr = scr_ptr + (grp * n_split + split).to(tl.int64) * (2 * GP * NP * BN)
    t_end = tl.minimum(split * TILES + TILES, tiles)
    # No key tile is loaded ahead by hand: the barrier below keeps Triton's pipeliner off this
    # loop, and a tile held in registers for the next iteration made the kernel spill (255
    # registers at 8 warps, RESULTS.md run 66's ncu; run 67: 2-15% faster without).
    for t in range(split * TILES, t_end):
        s0 = t * BN
        k = probe_keys(k_ptr, s0, offs_n, offs_d, S, sks, skd, D)
        s, visible = tile_logits(q, k, s0, offs_n, rows, row_ok, S, qk_scale, DOT_PRECISION)
        p = tl.where(visible, tl.math.exp2(s - lse[:, None]), 0.0)
        column = tl.sum(tl.reshape(p, (GP, NP, BN)), 1) / R                       # (GP, BN)
        tl.store(col_ptr + out + s0 + offs_n[None, :], column,
                 mask=(s0 + offs_n < S)[None, :])
        if DIAGONALS:
            # x row-major into one of the slot's two (GP * NP, BN) halves (by tile parity),
            # read back with a row pitch of BN + 1: for a head's row r, entry c is
            # x[r, c + r - NP + 1], the diagonals as columns. On the GPU, bar.sync orders the
            # CTA's global writes before its reads (the interpreter runs a program in order;
            # the barrier is a no-op there); the two halves spare a second barrier before the
            # writes, since a half is rewritten only after the next tile's barrier, which every
            # thread reaches after its reads of that half.
            half = scr + (t % 2) * (GP * NP * BN)
            each = tl.reshape(tl.broadcast_to(column[:, None, :], (GP, NP, BN)), (GP * NP, BN))
            x = tl.where(visible, p - each, 0.0)
            tl.store(half + offs_i[:, None] * BN + offs_n[None, :], x, mask=row_ok[:, None])
            tl.debug_barrier()
            for g in tl.static_range(GP):
                first = tl.zeros([2 * BN], tl.float32)
                second = tl.zeros([2 * BN], tl.float32)
                for chunk in tl.static_range(NP // ROWS):
                    rr = chunk * ROWS + tl.arange(0, ROWS)
                    n = offs_c[None, :] + rr[:, None] - (NP - 1)   # the key of (row, c)
                    ok = (n >= 0) & (n < BN) & (rr < R)[:, None]
                    y = tl.load(half + (g * NP + rr)[:, None] * BN + n, mask=ok, other=0.0)
                    in_first = (rr < R // 2)[:, None]
                    first += tl.sum(tl.where(in_first, y, 0.0), 0)
                    second += tl.sum(tl.where(in_first, 0.0, y), 0)
                dst = ((bh0 + g).to(tl.int64) * tiles + t) * (2 * BN) + offs_c
                tl.store(first_ptr + dst, first)
                tl.store(second_ptr + dst, second)


@triton.jit
def _diagonal_at(first_ptr, second_ptr, bh, o, S, R, tiles, diag_scale,
                 NP: tl.constexpr, BN: tl.constexpr, ONE_ROW: tl.constexpr):
    """Diagonal scores at offsets o (0 outside [0, S)) from the per-tile sums: offset o is
    c = w % BN of tile w // BN and c + BN of the tile before, w = S - R + NP - 1 - o."""
    ok = (o >= 0) & (o < S)
    w = tl.where(ok, S - R + NP - 1 - o, 0)
    t = w // BN
    a = (bh.to(tl.int64) * tiles + t) * (2 * BN) + w % BN
    b = a - BN         # tile t - 1, column c + BN
    ok_a = ok & (t < tiles)
    ok_b = ok & (t >= 1)
    second = (tl.load(second_ptr + a, mask=ok_a, other=0.0)
              + tl.load(second_ptr + b, mask=ok_b, other=0.0))
    if ONE_ROW:
        diag = second
    else:
        first = (tl.load(first_ptr + a, mask=ok_a, other=0.0)
                 + tl.load(first_ptr + b, mask=ok_b, other=0.0))
        diag = tl.minimum(first, second) * diag_scale
    return tl.where(ok, diag, 0.0)


@triton.jit
def _finalize_kernel(col_ptr, first_ptr, second_ptr, diag_ptr, cflag_ptr, dflag_ptr,
                     S, R, M, bs, diag_scale, threshold,
                     NP: tl.constexpr, BN: tl.constexpr, BSP: tl.constexpr,
                     ONE_ROW: tl.constexpr, SCORES: tl.constexpr, FLAGS: tl.constexpr):
    """Grid (B * H, M): the diagonal scores of offsets m * bs .. + bs (SCORES: stored to diag
    (B * H, S)); FLAGS: column_blocks[m] and diagonal_blocks[m] (B * H, M) bool, the rule of
    ``flags_from_scores`` (offsets of block m - 1 off its first make block m too)."""
    bh = tl.program_id(0)
    blk = tl.program_id(1)
    tiles = tl.cdiv(S, BN)
    offs = tl.arange(0, BSP)
    o = blk * bs + offs
    mine = (offs < bs) & (o < S)
    diag = _diagonal_at(first_ptr, second_ptr, bh, o, S, R, tiles, diag_scale, NP, BN,
                        ONE_ROW)
    if SCORES:
        tl.store(diag_ptr + bh.to(tl.int64) * S + o, diag, mask=mine)
    if FLAGS:
        threshold = tl.cast(threshold, tl.float32)
        col = tl.load(col_ptr + bh.to(tl.int64) * S + o, mask=mine, other=0.0)
        heavy_col = tl.max(((col >= threshold) & mine).to(tl.int32), 0) > 0
        heavy = tl.max(((diag >= threshold) & mine).to(tl.int32), 0) > 0
        o_prev = o - bs
        prev = _diagonal_at(first_ptr, second_ptr, bh, o_prev, S, R, tiles, diag_scale,
                            NP, BN, ONE_ROW)
        prev_ok = (offs > 0) & (offs < bs) & (o_prev >= 0)
        partial = tl.max(((prev >= threshold) & prev_ok).to(tl.int32), 0) > 0
        flag = bh * M + blk
        tl.store(cflag_ptr + flag, heavy_col)
        tl.store(dflag_ptr + flag, heavy | partial)


# H200, H 32, bf16 (RESULTS.md run 42): 1 / 2 / 4 programs per SM took 1.07 / 0.89 / 0.72 ms at
# 32K and 4.25 / 3.54 / 3.01 ms at 128K (8 warps).
PROGRAMS_PER_SM = 4
# Run 74: the LSE pass with its own split (1-4 per SM, 4 or 8 warps) or the scores programs at
# 2-3 per SM, and 1-8 warps for the finalisation, measured within noise or slower.
# Run 67 (no key tile held ahead): 4 warps 0.56 / 2.58 ms (last block's rows, 4 per SM) and
# 0.182 / 0.668 ms (last 32 rows, 2 per SM) at 32K / 128K; 8 warps 0.68 / 2.83 and 0.204 / 0.733.
NUM_WARPS = 4
# Keys per tile of the skew programs (or the padded probe rows, if more). Last 32 rows, 4 warps,
# 4 per SM (run 69): 64 keys 0.170 / 0.589 ms at 32K / 128K, 128 keys 0.194 / 0.659.
KEYS = 64


def packing(G: int, rows: int) -> int:
    """Query heads of one kv group per probe program: the largest power of two dividing G with
    at most 128 packed rows (``rows``, the padded probe rows of one head)."""
    packed = 1
    while G % (2 * packed) == 0 and 2 * packed * rows <= 128:
        packed *= 2
    return packed


def skew_scores(q: torch.Tensor, k: torch.Tensor, scale: float, block_size: int, *,
                num_warps: int | None = None, diagonals: bool = True,
                programs_per_sm: int | None = None, threshold: float | None = None,
                n_rows: int | None = None, keys: int | None = None,
                flag_dtype: torch.dtype = torch.bool):
    """The "skew" variant: (column, diagonal) scores (B, H, S) fp32, or with a threshold the
    block flags (column_blocks, diagonal_blocks) (B, H, M) bool of ``flags_from_scores``.
    Inputs as ``vertical_slash_scores``; programs_per_sm (default ``PROGRAMS_PER_SM``) sets the
    splits of each head's key tiles so that B * H // GP * splits is about that many programs
    per SM. flag_dtype: the flags' dtype, bool or uint8 (what the search reads, uncopied).
    The query heads of a kv group share programs (``packing``: one row tile, one K load) and the
    key tiles hold ``keys`` (default KEYS, a power of two) keys, at least the padded rows."""
    shape = probe_shape(q, k, block_size, n_rows)
    B, H, S, NP = shape.B, shape.H, shape.S, shape.BLOCK
    GP = packing(H // shape.Hkv, NP)
    if keys is not None and (keys < 16 or keys & (keys - 1)):
        raise ValueError(f"skew_scores: keys={keys}, not a power of two >= 16")
    BN = max(keys or KEYS, NP)
    tiles = cdiv(S, BN)
    groups = B * H // GP
    if q.is_cuda and not interpreting():
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    else:
        sms = 4
    if flag_dtype not in (torch.bool, torch.uint8):
        raise ValueError(f"skew_scores: flag_dtype={flag_dtype}, not torch.bool or torch.uint8")
    per_split, splits = split_tiles(tiles, cdiv((programs_per_sm or PROGRAMS_PER_SM) * sms,
                                                groups))
    opts = {} if interpreting() else dict(num_warps=num_warps or NUM_WARPS)
    qk_scale = float(scale) * LOG2E
    m, l = lse_partials(q, k, shape, qk_scale, per_split, splits, opts, packed=GP, keys=BN)
    column = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    first = torch.empty(B * H, tiles, 2 * BN, dtype=torch.float32, device=q.device)
    second = torch.empty_like(first)
    scratch = torch.empty(groups * splits if diagonals else 1, 2, GP * NP, BN,
                          dtype=torch.float32, device=q.device)
    launcher(_skew_scores_kernel)[(groups, splits)](
        q, k, m, l, column, first, second, scratch, *shape.strides, S, shape.R, H,
        H // shape.Hkv, per_split, qk_scale, D=shape.D, DP=shape.DP, NP=NP, GP=GP, BN=BN,
        SPLITS_P=max(2, triton.next_power_of_2(splits)), ROWS=min(32, NP),
        DOT_PRECISION=shape.precision, DIAGONALS=diagonals, **opts)
    flags = threshold is not None
    if not diagonals:
        if flags:
            raise ValueError("skew_scores: the flags need the diagonal sums")
        return column, torch.zeros_like(column)
    diagonal = column if flags else torch.empty_like(column)   # not written with flags
    cflag = torch.empty(B, H, shape.M, dtype=flag_dtype, device=q.device)
    dflag = torch.empty_like(cflag)
    fin = {} if interpreting() else dict(num_warps=4)
    launcher(_finalize_kernel)[(B * H, shape.M)](
        column, first, second, diagonal, cflag, dflag, S, shape.R, shape.M, block_size,
        2.0 / shape.R, float(threshold) if flags else 0.0, NP=NP, BN=BN,
        BSP=max(16, triton.next_power_of_2(block_size)), ONE_ROW=shape.R == 1,
        SCORES=not flags, FLAGS=flags, **fin)
    return (cflag, dflag) if flags else (column, diagonal)
