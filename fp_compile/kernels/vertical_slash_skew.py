"""The vertical/slash probe's shared pieces and its "skew" variant (issue 14).

Shared with the "gather" variant in ``vertical_slash``: the probe rows and their logits against a
key tile (``probe_rows``, ``probe_logits``), the sizes of a probe (``probe_shape``) and the first
pass, the probe rows' log-sum-exp over key tiles split across programs (``lse_partials``).

The "skew" variant (``skew_scores``) has three launches and no torch op between them:

1. the LSE partials, (B * H, splits) programs, each over a run of key tiles;
2. the scores, the same (B * H, splits) programs: each combines the LSE partials itself, keeps
   its q rows in registers and loops over its run of key tiles. Per tile: the softmax p, its
   column sums (stored), and the tile's diagonal sums of the excess x = p - column. The
   diagonals become columns through a per-program global scratch: x (BLOCK, BLOCK) is written
   row-major (coalesced) and read back with a row pitch of BLOCK + 1, which puts x[r, n] at
   column c = n - r + BLOCK - 1 of a (BLOCK, 2 * BLOCK) view, masked to the entries written, and
   summed over rows (first R // 2 rows and the others apart).
   The two (2 * BLOCK,) sums of a tile are stored to its own slot: no atomics, no zeroing;
3. the finalisation, (B * H, M) programs: offset o collects its (at most two) tiles' sums, the
   diagonal score is the smaller half's mean, and with a threshold the block flags of
   ``flags_from_scores`` come out of the same program (the flags of block m need the heavy
   offsets of blocks m and m - 1, both computed here).

The scratch holds B * H * splits slots of two BLOCK x BLOCK fp32 halves (128 KiB at BLOCK 128),
with a few programs per SM (``programs_per_sm``); a slot belongs to one program for its run.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .utils import LOG2E, cdiv, interpreting, launcher


class ProbeShape(NamedTuple):
    """Sizes of a probe: q (B, H, S, D), k (B, Hkv, S, D); M blocks of block_size, the last one
    holding R probe rows; BLOCK (power of two >= R) rows and keys per tile, DP the padded head
    dim, tiles = cdiv(S, BLOCK) key tiles."""
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


def probe_shape(q: torch.Tensor, k: torch.Tensor, block_size: int) -> ProbeShape:
    B, H, S, D = q.shape
    M = cdiv(S, block_size)
    R = S - (M - 1) * block_size
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
def probe_rows(q_ptr, k_ptr, bh, sqb, sqh, sqs, sqd, skb, skh, S, R, H, G,
               D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr):
    """The probe rows of (batch * head) bh: its q rows S - R .. S - 1 (BLOCK, DP), padding 0,
    k_ptr moved to its kv head, and the row / key / dim offsets with the rows' validity."""
    b = bh // H
    h = bh % H
    offs_r = tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, DP)
    rows = S - R + offs_r
    row_ok = offs_r < R
    q = tl.load(q_ptr + b.to(tl.int64) * sqb + h * sqh + rows[:, None].to(tl.int64) * sqs
                + offs_d[None, :] * sqd, mask=row_ok[:, None] & (offs_d < D)[None, :],
                other=0.0)
    k_ptr += b.to(tl.int64) * skb + (h // G) * skh
    return q, k_ptr, offs_r, offs_n, offs_d, rows, row_ok


@triton.jit
def _probe_lse_kernel(q_ptr, k_ptr, m_ptr, l_ptr, sqb, sqh, sqs, sqd, skb, skh, sks, skd,
                      S, R, H, G, TILES, qk_scale,
                      D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    """Grid (B * H, splits): the probe rows' running max / sum (log2 units) over key tiles
    split * TILES .. + TILES; m, l (B * H, splits, BLOCK) fp32."""
    qk_scale = tl.cast(qk_scale, tl.float32)   # torch.compile may pass an fp64
    bh = tl.program_id(0)
    split = tl.program_id(1)
    q, k_ptr, offs_r, offs_n, offs_d, rows, row_ok = probe_rows(
        q_ptr, k_ptr, bh, sqb, sqh, sqs, sqd, skb, skh, S, R, H, G, D, DP, BLOCK)
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    for t in range(split * TILES, tl.minimum(split * TILES + TILES, tl.cdiv(S, BLOCK))):
        s, _ = probe_logits(q, k_ptr, t * BLOCK, offs_n, offs_d, rows, row_ok, S, sks, skd,
                            qk_scale, D, DOT_PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.math.exp2(m_i - m_sub) + tl.sum(tl.math.exp2(s - m_sub[:, None]), 1)
        m_i = m_new
    out = (bh * tl.num_programs(1) + split) * BLOCK + offs_r
    tl.store(m_ptr + out, m_i)
    tl.store(l_ptr + out, l_i)


def split_tiles(tiles: int, splits: int) -> tuple[int, int]:
    """(tiles per split, splits) for about ``splits`` runs of key tiles, none empty."""
    per_split = max(1, cdiv(tiles, max(1, splits)))
    return per_split, cdiv(tiles, per_split)


def lse_partials(q: torch.Tensor, k: torch.Tensor, shape: ProbeShape, qk_scale: float,
                 per_split: int, splits: int, opts: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The first pass: running max m and sum l (log2 units) of the probe rows over each run of
    ``per_split`` key tiles, each (B * H, splits, BLOCK) fp32."""
    m = torch.empty(shape.B * shape.H, splits, shape.BLOCK, dtype=torch.float32,
                    device=q.device)
    l = torch.empty_like(m)
    launcher(_probe_lse_kernel)[(shape.B * shape.H, splits)](
        q, k, m, l, *shape.strides, shape.S, shape.R, shape.H, shape.H // shape.Hkv, per_split,
        qk_scale, D=shape.D, DP=shape.DP, BLOCK=shape.BLOCK, DOT_PRECISION=shape.precision,
        **opts)
    return m, l


# ------------------------------------------------------------------------ the skew variant

@triton.jit
def _skew_scores_kernel(q_ptr, k_ptr, m_ptr, l_ptr, col_ptr, first_ptr, second_ptr, scr_ptr,
                        sqb, sqh, sqs, sqd, skb, skh, sks, skd, S, R, H, G, TILES, qk_scale,
                        D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr,
                        SPLITS_P: tl.constexpr, ROWS: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, DIAGONALS: tl.constexpr):
    """Grid (B * H, splits), as the LSE pass. column (B * H, S): mean over the probe rows of p;
    first / second (B * H, tiles, 2 * BLOCK): per tile, at c = n - r + BLOCK - 1 (offset
    o = S - R - s0 + BLOCK - 1 - c), the excess x[r, n] summed over the first R // 2 rows and
    over the others; scr (B * H * splits, 2, BLOCK, BLOCK) fp32, a slot per program."""
    qk_scale = tl.cast(qk_scale, tl.float32)
    bh = tl.program_id(0)
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    q, k_ptr, offs_r, offs_n, offs_d, rows, row_ok = probe_rows(
        q_ptr, k_ptr, bh, sqb, sqh, sqs, sqd, skb, skh, S, R, H, G, D, DP, BLOCK)
    # the LSE partials' combine, as the gather variant's torch ops do it
    offs_p = tl.arange(0, SPLITS_P)
    part = (bh * n_split + offs_p[:, None]) * BLOCK + offs_r[None, :]
    m = tl.load(m_ptr + part, mask=(offs_p < n_split)[:, None], other=float("-inf"))
    l = tl.load(l_ptr + part, mask=(offs_p < n_split)[:, None], other=0.0)
    m_max = tl.max(m, 0)
    m_sub = tl.where(m_max == float("-inf"), 0.0, m_max)
    lse = m_sub + tl.math.log2(tl.sum(l * tl.math.exp2(m - m_sub[None, :]), 0))

    tiles = tl.cdiv(S, BLOCK)
    out = bh.to(tl.int64) * S
    offs_c = tl.arange(0, 2 * BLOCK)
    scr = scr_ptr + (bh * n_split + split).to(tl.int64) * (2 * BLOCK * BLOCK)
    t_end = tl.minimum(split * TILES + TILES, tiles)
    # The next key tile is loaded one iteration ahead by hand: the barriers below keep
    # Triton's pipeliner off this loop.
    k_next = probe_keys(k_ptr, split * TILES * BLOCK, offs_n, offs_d, S, sks, skd, D)
    for t in range(split * TILES, t_end):
        s0 = t * BLOCK
        k = k_next
        k_next = probe_keys(k_ptr, s0 + BLOCK, offs_n, offs_d, tl.minimum(S, t_end * BLOCK),
                            sks, skd, D)
        s, visible = tile_logits(q, k, s0, offs_n, rows, row_ok, S, qk_scale, DOT_PRECISION)
        p = tl.where(visible, tl.math.exp2(s - lse[:, None]), 0.0)
        column = tl.sum(p, 0) / R
        tl.store(col_ptr + out + s0 + offs_n, column, mask=s0 + offs_n < S)
        if DIAGONALS:
            # x row-major into one of the slot's two (BLOCK, BLOCK) halves (by tile parity),
            # read back with a row pitch of BLOCK + 1: entry (r, c) is x[r, c + r - BLOCK + 1],
            # the diagonals as columns. On the GPU, bar.sync orders the CTA's global writes
            # before its reads (the interpreter runs a program in order; the barrier is a
            # no-op there); the two halves spare a second barrier before the writes, since a
            # half is rewritten only after the next tile's barrier, which every thread reaches
            # after its reads of that half.
            half = scr + (t % 2) * (BLOCK * BLOCK)
            x = tl.where(visible, p - column[None, :], 0.0)
            tl.store(half + offs_r[:, None] * BLOCK + offs_n[None, :], x, mask=row_ok[:, None])
            tl.debug_barrier()
            first = tl.zeros([2 * BLOCK], tl.float32)
            second = tl.zeros([2 * BLOCK], tl.float32)
            for chunk in tl.static_range(BLOCK // ROWS):
                rr = chunk * ROWS + tl.arange(0, ROWS)
                n = offs_c[None, :] + rr[:, None] - (BLOCK - 1)   # the key of (row, c)
                ok = (n >= 0) & (n < BLOCK) & (rr < R)[:, None]
                y = tl.load(half + rr[:, None] * BLOCK + n, mask=ok, other=0.0)
                in_first = (rr < R // 2)[:, None]
                first += tl.sum(tl.where(in_first, y, 0.0), 0)
                second += tl.sum(tl.where(in_first, 0.0, y), 0)
            dst = (bh.to(tl.int64) * tiles + t) * (2 * BLOCK) + offs_c
            tl.store(first_ptr + dst, first)
            tl.store(second_ptr + dst, second)


@triton.jit
def _diagonal_at(first_ptr, second_ptr, bh, o, S, R, tiles, diag_scale,
                 BLOCK: tl.constexpr, ONE_ROW: tl.constexpr):
    """Diagonal scores at offsets o (0 outside [0, S)) from the per-tile sums: offset o is
    c = w % BLOCK of tile w // BLOCK and c + BLOCK of the tile before, w = S - R + BLOCK - 1 - o."""
    ok = (o >= 0) & (o < S)
    w = tl.where(ok, S - R + BLOCK - 1 - o, 0)
    t = w // BLOCK
    a = (bh.to(tl.int64) * tiles + t) * (2 * BLOCK) + w % BLOCK
    b = a - BLOCK      # tile t - 1, column c + BLOCK
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
                     BLOCK: tl.constexpr, BSP: tl.constexpr, ONE_ROW: tl.constexpr,
                     SCORES: tl.constexpr, FLAGS: tl.constexpr):
    """Grid (B * H, M): the diagonal scores of offsets m * bs .. + bs (SCORES: stored to diag
    (B * H, S)); FLAGS: column_blocks[m] and diagonal_blocks[m] (B * H, M) bool, the rule of
    ``flags_from_scores`` (offsets of block m - 1 off its first make block m too)."""
    bh = tl.program_id(0)
    blk = tl.program_id(1)
    tiles = tl.cdiv(S, BLOCK)
    offs = tl.arange(0, BSP)
    o = blk * bs + offs
    mine = (offs < bs) & (o < S)
    diag = _diagonal_at(first_ptr, second_ptr, bh, o, S, R, tiles, diag_scale, BLOCK, ONE_ROW)
    if SCORES:
        tl.store(diag_ptr + bh.to(tl.int64) * S + o, diag, mask=mine)
    if FLAGS:
        threshold = tl.cast(threshold, tl.float32)
        col = tl.load(col_ptr + bh.to(tl.int64) * S + o, mask=mine, other=0.0)
        heavy_col = tl.max(((col >= threshold) & mine).to(tl.int32), 0) > 0
        heavy = tl.max(((diag >= threshold) & mine).to(tl.int32), 0) > 0
        o_prev = o - bs
        prev = _diagonal_at(first_ptr, second_ptr, bh, o_prev, S, R, tiles, diag_scale,
                            BLOCK, ONE_ROW)
        prev_ok = (offs > 0) & (offs < bs) & (o_prev >= 0)
        partial = tl.max(((prev >= threshold) & prev_ok).to(tl.int32), 0) > 0
        flag = bh * M + blk
        tl.store(cflag_ptr + flag, heavy_col)
        tl.store(dflag_ptr + flag, heavy | partial)


# H200, H 32, bf16 (RESULTS.md run 42): 1 / 2 / 4 programs per SM took 1.07 / 0.89 / 0.72 ms at
# 32K and 4.25 / 3.54 / 3.01 ms at 128K (8 warps).
PROGRAMS_PER_SM = 4


def skew_scores(q: torch.Tensor, k: torch.Tensor, scale: float, block_size: int, *,
                num_warps: int | None = None, diagonals: bool = True,
                programs_per_sm: int | None = None, threshold: float | None = None):
    """The "skew" variant: (column, diagonal) scores (B, H, S) fp32, or with a threshold the
    block flags (column_blocks, diagonal_blocks) (B, H, M) bool of ``flags_from_scores``.
    Inputs as ``vertical_slash_scores``; programs_per_sm (default ``PROGRAMS_PER_SM``) sets the
    splits of each head's key tiles so that B * H * splits is about that many programs per SM."""
    shape = probe_shape(q, k, block_size)
    B, H, S, BLOCK = shape.B, shape.H, shape.S, shape.BLOCK
    if q.is_cuda and not interpreting():
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    else:
        sms = 4
    per_split, splits = split_tiles(shape.tiles, cdiv((programs_per_sm or PROGRAMS_PER_SM) * sms, B * H))
    opts = launch_options(shape, num_warps)
    qk_scale = float(scale) * LOG2E
    m, l = lse_partials(q, k, shape, qk_scale, per_split, splits, opts)
    column = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    first = torch.empty(B * H, shape.tiles, 2 * BLOCK, dtype=torch.float32, device=q.device)
    second = torch.empty_like(first)
    scratch = torch.empty(B * H * splits if diagonals else 1, 2, BLOCK, BLOCK,
                          dtype=torch.float32, device=q.device)
    launcher(_skew_scores_kernel)[(B * H, splits)](
        q, k, m, l, column, first, second, scratch, *shape.strides, S, shape.R, H,
        H // shape.Hkv, per_split, qk_scale, D=shape.D, DP=shape.DP, BLOCK=BLOCK,
        SPLITS_P=max(2, triton.next_power_of_2(splits)), ROWS=min(32, BLOCK),
        DOT_PRECISION=shape.precision, DIAGONALS=diagonals, **opts)
    flags = threshold is not None
    if not diagonals:
        if flags:
            raise ValueError("skew_scores: the flags need the diagonal sums")
        return column, torch.zeros_like(column)
    diagonal = column if flags else torch.empty_like(column)   # not written with flags
    cflag = torch.empty(B, H, shape.M, dtype=torch.bool, device=q.device)
    dflag = torch.empty_like(cflag)
    fin = {} if interpreting() else dict(num_warps=4)
    launcher(_finalize_kernel)[(B * H, shape.M)](
        column, first, second, diagonal, cflag, dflag, S, shape.R, shape.M, block_size,
        2.0 / shape.R, float(threshold) if flags else 0.0, BLOCK=BLOCK,
        BSP=max(16, triton.next_power_of_2(block_size)), ONE_ROW=shape.R == 1,
        SCORES=not flags, FLAGS=flags, **fin)
    return (cflag, dflag) if flags else (column, diagonal)
