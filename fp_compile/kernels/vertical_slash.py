"""Vertical/slash detector: adds the key blocks of heavy columns and diagonals to a selection.

Mean-pooled block scores dilute one heavy key by the block size, so FlashPrefill's pattern
search misses attention-sink-like columns and slash lines. This stage looks at the exact
attention of the last query block (one block of dense attention per head), flags key blocks
holding a heavy column and diagonal block offsets holding a heavy diagonal
(``vertical_slash_flags``, (B, H, M) each); the pattern search ORs them into its kept sets
(``pattern_search(..., vs_blocks=)``), the reference into its mask (``add_vertical_slash``).

The probe's scores come from a Triton kernel (``vertical_slash_scores``, two launches: the
probe rows' log-sum-exp over key tiles split across programs, then per key tile the rows'
softmax, its column sums and, through an in-register gather that turns the tile's diagonals into
columns, its diagonal sums) or from the plain-torch reference beside it
(``vertical_slash_scores_reference``); both feed the same flag rule. No S x S tensor, no host
synchronisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .utils import LOG2E, acc_dtype, cdiv, check_kernel_dtype, group_view, interpreting, launcher


def vertical_slash_flags(q: torch.Tensor, k: torch.Tensor, scale: float, block_size: int,
                         threshold: float, kernel: bool | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(column_blocks, diagonal_blocks), each (B, H, M) bool.

    kernel: the Triton probe (``vertical_slash_scores``) or the reference; None picks the
    kernel where it runs (CUDA or the interpreter, a kernel dtype, blocks of at most 128)."""
    if kernel is None:
        kernel = (q.is_cuda or interpreting()) and q.dtype in (
            torch.float16, torch.bfloat16, torch.float32) and block_size <= 128
    if kernel:
        column, diagonal = vertical_slash_scores(q, k, scale, block_size)
        return flags_from_scores(column, diagonal, block_size, threshold)
    Hkv = k.shape[1]
    G = q.shape[1] // Hkv
    cols, diags = [], []
    for h in range(Hkv):   # one kv head at a time: scratch O(G * block * S)
        c, d = vertical_slash_flags_reference(q[:, h * G:(h + 1) * G], k[:, h:h + 1], scale,
                                              block_size, threshold)
        cols.append(c)
        diags.append(d)
    return torch.cat(cols, dim=1), torch.cat(diags, dim=1)


# --------------------------------------------------------------------------------- kernel

@triton.jit
def _probe_logits(q, k_ptr, s0, offs_n, offs_d, rows, row_ok, S, sks, skd, qk_scale,
                  D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """log2-unit logits of the probe rows against keys s0 + offs_n; -inf where not visible."""
    cols = s0 + offs_n
    k = tl.load(k_ptr + cols[:, None].to(tl.int64) * sks + offs_d[None, :] * skd,
                mask=(cols < S)[:, None] & (offs_d < D)[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    visible = row_ok[:, None] & (cols[None, :] <= rows[:, None]) & (cols < S)[None, :]
    return tl.where(visible, s, float("-inf")), visible


@triton.jit
def _probe_rows(q_ptr, k_ptr, bh, sqb, sqh, sqs, sqd, skb, skh, S, R, H, G,
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
    q, k_ptr, offs_r, offs_n, offs_d, rows, row_ok = _probe_rows(
        q_ptr, k_ptr, bh, sqb, sqh, sqs, sqd, skb, skh, S, R, H, G, D, DP, BLOCK)
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    for t in range(split * TILES, tl.minimum(split * TILES + TILES, tl.cdiv(S, BLOCK))):
        s, _ = _probe_logits(q, k_ptr, t * BLOCK, offs_n, offs_d, rows, row_ok, S, sks, skd,
                             qk_scale, D, DOT_PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.math.exp2(m_i - m_sub) + tl.sum(tl.math.exp2(s - m_sub[:, None]), 1)
        m_i = m_new
    out = (bh * tl.num_programs(1) + split) * BLOCK + offs_r
    tl.store(m_ptr + out, m_i)
    tl.store(l_ptr + out, l_i)


@triton.jit
def _probe_scores_kernel(q_ptr, k_ptr, lse_ptr, col_ptr, first_ptr, second_ptr,
                         sqb, sqh, sqs, sqd, skb, skh, sks, skd, S, R, H, G, qk_scale,
                         D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, DIAGONALS: tl.constexpr):
    """Grid (B * H, key tiles): the probe rows' softmax p over the tile's keys (lse: (B * H,
    BLOCK) log2 units); column[s] = sum_r p[r, s] / R stored; excess x[r, s] = p[r, s] -
    column[s] (s <= r) summed along each diagonal o = r - s over the first R // 2 rows and over
    the others, atomically added to first / second (B * H, S) (at most two tiles reach an
    offset, so the sum is exact whatever their order).

    A tile's diagonals become columns through a gather along the key axis: for c in
    [0, 2 * BLOCK), key kappa = rho - c + BLOCK - 1 of row rho lies on offset
    o = (S - R - s0) - (BLOCK - 1) + c; the first BLOCK values of c gather kappa = rho + (BLOCK
    - 1 - c), the next BLOCK kappa = rho - 1 - (c - BLOCK).
    """
    qk_scale = tl.cast(qk_scale, tl.float32)
    bh = tl.program_id(0)
    s0 = tl.program_id(1) * BLOCK
    q, k_ptr, offs_r, offs_n, offs_d, rows, row_ok = _probe_rows(
        q_ptr, k_ptr, bh, sqb, sqh, sqs, sqd, skb, skh, S, R, H, G, D, DP, BLOCK)
    s, visible = _probe_logits(q, k_ptr, s0, offs_n, offs_d, rows, row_ok, S, sks, skd,
                               qk_scale, D, DOT_PRECISION)
    lse = tl.load(lse_ptr + bh * BLOCK + offs_r)
    p = tl.where(visible, tl.math.exp2(s - lse[:, None]), 0.0)
    column = tl.sum(p, 0) / R
    out = bh.to(tl.int64) * S
    tl.store(col_ptr + out + s0 + offs_n, column, mask=s0 + offs_n < S)
    if not DIAGONALS:
        return
    x = tl.where(visible, p - column[None, :], 0.0)
    first_rows = (offs_r < R // 2)[:, None]
    c = offs_n[None, :]
    rho = offs_r[:, None]
    o_base = S - R - s0 - (BLOCK - 1)
    for part in tl.static_range(2):
        if part == 0:
            kappa = rho + (BLOCK - 1) - c
        else:
            kappa = rho - 1 - c
        ok = (kappa >= 0) & (kappa < BLOCK)
        y = tl.where(ok, tl.gather(x, tl.where(ok, kappa, 0), axis=1), 0.0)
        o = o_base + part * BLOCK + offs_n
        o_ok = (o >= 0) & (o < S)
        tl.atomic_add(first_ptr + out + o, tl.sum(tl.where(first_rows, y, 0.0), 0), mask=o_ok,
                      sem="relaxed")
        tl.atomic_add(second_ptr + out + o, tl.sum(tl.where(first_rows, 0.0, y), 0), mask=o_ok,
                      sem="relaxed")


def vertical_slash_scores(q: torch.Tensor, k: torch.Tensor, scale: float, block_size: int,
                          *, num_warps: int | None = None, diagonals: bool = True
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``vertical_slash_scores_reference``: (column, diagonal), each (B, H, S) fp32.

    q (B, H, S, D), k (B, Hkv, S, D), fp16/bf16/fp32, any strides; block_size <= 128.
    num_warps: launch option (tuning); diagonals=False skips the diagonal sums (tuning: their
    share of the time), leaving the diagonal scores 0."""
    check_kernel_dtype(q, "vertical_slash_scores")
    if block_size > 128:
        raise ValueError(f"vertical_slash_scores: block_size={block_size} above 128 (the "
                         f"reference serves it)")
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    M = cdiv(S, block_size)
    R = S - (M - 1) * block_size
    BLOCK = max(16, triton.next_power_of_2(R))
    DP = max(16, triton.next_power_of_2(D))
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    tiles = cdiv(S, BLOCK)
    per_split = max(1, cdiv(tiles, 16))          # about 16 programs per head for the LSE
    splits = cdiv(tiles, per_split)
    m = torch.empty(B * H, splits, BLOCK, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    qk_scale = float(scale) * LOG2E
    strides = (*q.stride(), *k.stride())
    opts = {} if interpreting() else dict(
        num_warps=num_warps or (8 if BLOCK * DP >= 128 * 128 else 4))
    launcher(_probe_lse_kernel)[(B * H, splits)](
        q, k, m, l, *strides, S, R, H, H // Hkv, per_split, qk_scale,
        D=D, DP=DP, BLOCK=BLOCK, DOT_PRECISION=precision, **opts)
    m_max = m.amax(dim=1, keepdim=True)
    m_sub = torch.where(m_max.isneginf(), 0.0, m_max)
    lse = (m_sub + torch.log2((l * torch.exp2(m - m_sub)).sum(dim=1, keepdim=True)))[:, 0]
    column = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    first = torch.zeros(B, H, S, dtype=torch.float32, device=q.device)
    second = torch.zeros_like(first)
    launcher(_probe_scores_kernel)[(B * H, tiles)](
        q, k, lse.contiguous(), column, first, second, *strides, S, R, H, H // Hkv, qk_scale,
        D=D, DP=DP, BLOCK=BLOCK, DOT_PRECISION=precision, DIAGONALS=diagonals, **opts)
    if R == 1:
        return column, second
    return column, torch.minimum(first, second) * (2.0 / R)


# ------------------------------------------------------------------------------ reference

def vertical_slash_scores_reference(q: torch.Tensor, k: torch.Tensor, scale: float,
                                    block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level attention of the last query block, per key column and per diagonal.

    The probe rows are the real rows r of the last query block (R = S - (M - 1) * block_size
    of them) and p their exact causal softmax (cost: one query block of dense attention, as
    MInference estimates vertical and slash lines). Returns two (B, H, S) tensors, fp32 (fp64
    for fp64 inputs):

    * ``column[s]`` = mean over r of p[r, s];
    * ``diagonal[o]`` = mean over r of (p[r, r - o] - column[r - o]) (terms with r - o < 0 are
      0): the mass on diagonal o beyond what the columns explain. A salient span seen from R
      rows puts as much on each diagonal as on each column; subtracting the column part keeps
      only what changes with the row, i.e. true slash lines.
    """
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    M = cdiv(S, block_size)
    r0 = (M - 1) * block_size
    rows = torch.arange(r0, S, device=q.device)
    kf = k.to(acc_dtype(k))
    qc = group_view(q[:, :, r0:], Hkv).to(kf.dtype)
    logits = scale * torch.matmul(qc, kf.unsqueeze(2).transpose(-1, -2))  # (B,Hkv,G,R,S)
    cols = torch.arange(S, device=q.device)
    logits = logits.masked_fill(cols[None, :] > rows[:, None], float("-inf"))
    p = torch.softmax(logits, dim=-1).flatten(1, 2)  # (B,H,R,S)
    column = p.mean(dim=-2)
    key = rows[:, None] - cols[None, :]  # (R, S): key index r - o, offset o along the last dim
    index = key.clamp_min(0).expand(B, H, -1, -1)
    excess = (p.gather(-1, index) - column[:, :, None, :].expand_as(p).gather(-1, index))
    excess = excess * (key >= 0)
    # A slash line is there in every row; row-to-row noise of a salient span is not: keep the
    # smaller of the two halves' means (with one row, its own excess).
    R = excess.shape[-2]
    if R == 1:
        return column, excess[..., 0, :]
    half = R // 2
    first = excess[..., :half, :].sum(dim=-2) / R * 2
    second = excess[..., half:, :].sum(dim=-2) / R * 2
    return column, torch.minimum(first, second)


def vertical_slash_flags_reference(q: torch.Tensor, k: torch.Tensor, scale: float,
                                   block_size: int, threshold: float
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Heavy key columns and diagonals as block flags, each (B, H, M) bool.

    ``column_blocks[j]``: key block j holds a key whose column score is >= threshold (a share
    of the probe rows' attention mass). ``diagonal_blocks[d]``: some offset o with diagonal
    score >= threshold makes query block i
    read key block i - d: o = c * block_size + m sends rows of block i to key blocks i - c
    (rows r >= m within the block) and i - c - 1 (rows r < m, when m > 0).
    """
    column, diagonal = vertical_slash_scores_reference(q, k, scale, block_size)
    return flags_from_scores(column, diagonal, block_size, threshold)


def flags_from_scores(column: torch.Tensor, diagonal: torch.Tensor, block_size: int,
                      threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The block flags of ``vertical_slash_flags_reference`` from (B, H, S) column and diagonal
    scores (of the kernel or the reference)."""
    B, H, S = column.shape
    M = cdiv(S, block_size)
    pad = M * block_size - S
    heavy_col = F.pad(column >= threshold, (0, pad))
    column_blocks = heavy_col.view(B, H, M, block_size).any(dim=-1)
    heavy = F.pad(diagonal >= threshold, (0, pad)).view(B, H, M, block_size)
    diagonal_blocks = heavy.any(dim=-1)  # offset block c = o // block_size
    partial = heavy[..., 1:].any(dim=-1)  # some heavy o with o % block_size > 0 -> also c + 1
    diagonal_blocks[..., 1:] |= partial[..., :-1]
    return column_blocks, diagonal_blocks


def add_vertical_slash(keep: torch.Tensor, column_blocks: torch.Tensor,
                       diagonal_blocks: torch.Tensor) -> torch.Tensor:
    """keep (B, H, n, M) rows of query blocks [M - n, ... ) or all M; returns keep with, for every
    query block i, key blocks j <= i where column_blocks[j] or diagonal_blocks[i - j] added."""
    M = keep.shape[-1]
    i = torch.arange(M - keep.shape[-2], M, device=keep.device)[:, None]
    j = torch.arange(M, device=keep.device)[None, :]
    causal = j <= i
    d = (i - j).clamp_min(0)
    extra = column_blocks[:, :, None, :] | diagonal_blocks[:, :, d]
    return keep | (extra & causal)
