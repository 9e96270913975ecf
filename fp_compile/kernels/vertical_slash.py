"""Vertical/slash detector: adds the key blocks of heavy columns and diagonals to a selection.

Mean-pooled block scores dilute one heavy key by the block size, so FlashPrefill's pattern
search misses attention-sink-like columns and slash lines. This stage looks at the exact
attention of the last query block (one block of dense attention per head; or of the prompt's
last ``n_rows`` rows, ``FlashPrefillConfig.vs_rows``), flags key blocks
holding a heavy column and diagonal block offsets holding a heavy diagonal
(``vertical_slash_flags``, (B, H, M) each); the pattern search ORs them into its kept sets
(``pattern_search(..., vs_blocks=)``), the reference into its mask (``add_vertical_slash``).

The probe's scores come from a Triton kernel (``vertical_slash_scores``, two passes: the
probe rows' log-sum-exp over key tiles split across programs, then per key tile the rows'
softmax, its column sums and its diagonal sums, the tile's diagonals turned into columns by an
in-register gather ("gather" variant) or through a per-program scratch ("skew", in
``vertical_slash_skew``)) or from the plain-torch reference beside it
(``vertical_slash_scores_reference``); both feed the same flag rule. No S x S tensor, no host
synchronisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .utils import LOG2E, acc_dtype, cdiv, check_kernel_dtype, group_view, interpreting, launcher
from .vertical_slash_skew import (launch_options, lse_partials, probe_logits, probe_rows,
                                  probe_shape, skew_scores, split_tiles)

# The Triton probe's variants (``vertical_slash_scores(variant=)``): "gather", one program per
# (head, key tile) turning diagonals into columns with tl.gather, its LSE combine and flag rule
# in torch ops; "skew", persistent programs over runs of key tiles, diagonals skewed through a
# per-program scratch, LSE combine, diagonal scores and flags in its kernels
# (``vertical_slash_skew``).
# H200 (RESULTS.md run 42): the flag stage took 0.89 / 3.55 ms with "skew" (2 programs per SM)
# against 1.27 / 4.78 ms with "gather" at 32K / 128K, same flags as the reference.
VARIANTS = ("gather", "skew")
DEFAULT_VARIANT = "skew"


def vertical_slash_flags(q: torch.Tensor, k: torch.Tensor, scale: float, block_size: int,
                         threshold: float, kernel: bool | None = None, *,
                         variant: str | None = None, num_warps: int | None = None,
                         programs_per_sm: int | None = None, n_rows: int | None = None,
                         flag_dtype: torch.dtype = torch.bool
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(column_blocks, diagonal_blocks), each (B, H, M) bool (or ``flag_dtype``: uint8 is what
    the Triton search reads; "skew" writes it directly, sparing the search two copies).

    n_rows: the probe rows are the prompt's last n_rows rows (None: the last query block's).

    kernel: the Triton probe (``vertical_slash_scores``) or the reference; None picks the
    kernel where it runs (CUDA or the interpreter, a kernel dtype, blocks of at most 128).
    variant, num_warps, programs_per_sm: the kernel's (``vertical_slash_scores``); "skew"
    computes the flags in its last kernel, "gather" with ``flags_from_scores``."""
    if kernel is None:
        kernel = (q.is_cuda or interpreting()) and q.dtype in (
            torch.float16, torch.bfloat16, torch.float32) and block_size <= 128
    if kernel:
        if _check(q, block_size, variant, n_rows) == "skew":
            return skew_scores(q, k, scale, block_size, num_warps=num_warps,
                               programs_per_sm=programs_per_sm, threshold=threshold,
                               n_rows=n_rows, flag_dtype=flag_dtype)
        column, diagonal = vertical_slash_scores(q, k, scale, block_size, variant=variant,
                                                 num_warps=num_warps, n_rows=n_rows)
        flags = flags_from_scores(column, diagonal, block_size, threshold)
        return flags[0].to(flag_dtype), flags[1].to(flag_dtype)
    Hkv = k.shape[1]
    G = q.shape[1] // Hkv
    cols, diags = [], []
    for h in range(Hkv):   # one kv head at a time: scratch O(G * block * S)
        c, d = vertical_slash_flags_reference(q[:, h * G:(h + 1) * G], k[:, h:h + 1], scale,
                                              block_size, threshold, n_rows)
        cols.append(c)
        diags.append(d)
    return torch.cat(cols, dim=1).to(flag_dtype), torch.cat(diags, dim=1).to(flag_dtype)


# --------------------------------------------------------------------------------- kernel

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
    q, k_ptr, offs_r, rows, row_ok, bh0 = probe_rows(
        q_ptr, k_ptr, bh, sqb, sqh, sqs, sqd, skb, skh, S, R, H, G, D, DP, BLOCK, 1)
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, DP)
    s, visible = probe_logits(q, k_ptr, s0, offs_n, offs_d, rows, row_ok, S, sks, skd,
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
                          *, num_warps: int | None = None, diagonals: bool = True,
                          variant: str | None = None, programs_per_sm: int | None = None,
                          n_rows: int | None = None, keys: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``vertical_slash_scores_reference``: (column, diagonal), each (B, H, S) fp32.

    q (B, H, S, D), k (B, Hkv, S, D), fp16/bf16/fp32, any strides; block_size <= 128.
    variant: one of ``VARIANTS`` (None: ``DEFAULT_VARIANT``), the same scores to fp32
    rounding. num_warps, programs_per_sm and keys (keys per tile) for "skew" only: launch
    options (tuning);
    diagonals=False skips the diagonal sums (tuning: their share of the time), leaving the
    diagonal scores 0. n_rows: as the reference's."""
    variant = _check(q, block_size, variant, n_rows)
    if variant == "skew":
        return skew_scores(q, k, scale, block_size, num_warps=num_warps, diagonals=diagonals,
                           programs_per_sm=programs_per_sm, n_rows=n_rows, keys=keys)
    shape = probe_shape(q, k, block_size, n_rows)
    B, H, S, BLOCK = shape.B, shape.H, shape.S, shape.BLOCK
    per_split, splits = split_tiles(shape.tiles, 16)    # about 16 programs per head
    opts = launch_options(shape, num_warps)
    qk_scale = float(scale) * LOG2E
    m, l = lse_partials(q, k, shape, qk_scale, per_split, splits, opts)
    m_max = m.amax(dim=1, keepdim=True)
    m_sub = torch.where(m_max.isneginf(), 0.0, m_max)
    lse = (m_sub + torch.log2((l * torch.exp2(m - m_sub)).sum(dim=1, keepdim=True)))[:, 0]
    column = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    first = torch.zeros(B, H, S, dtype=torch.float32, device=q.device)
    second = torch.zeros_like(first)
    launcher(_probe_scores_kernel)[(B * H, shape.tiles)](
        q, k, lse.contiguous(), column, first, second, *shape.strides, S, shape.R, H,
        H // shape.Hkv, qk_scale, D=shape.D, DP=shape.DP, BLOCK=BLOCK,
        DOT_PRECISION=shape.precision, DIAGONALS=diagonals, **opts)
    if shape.R == 1:
        return column, second
    return column, torch.minimum(first, second) * (2.0 / shape.R)


def _check(q: torch.Tensor, block_size: int, variant: str | None,
           n_rows: int | None = None) -> str:
    check_kernel_dtype(q, "vertical_slash_scores")
    if n_rows is not None and not 1 <= n_rows <= 128:
        raise ValueError(f"vertical_slash_scores: n_rows={n_rows} outside 1..128")
    if block_size > 128:
        raise ValueError(f"vertical_slash_scores: block_size={block_size} above 128 (the "
                         f"reference serves it)")
    variant = DEFAULT_VARIANT if variant is None else variant
    if variant not in VARIANTS:
        raise ValueError(f"vertical_slash_scores: variant={variant!r}, not one of {VARIANTS}")
    return variant


# ------------------------------------------------------------------------------ reference

def vertical_slash_scores_reference(q: torch.Tensor, k: torch.Tensor, scale: float,
                                    block_size: int, n_rows: int | None = None
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level attention of the last query block, per key column and per diagonal.

    The probe rows are the real rows r of the last query block (R = S - (M - 1) * block_size
    of them; ``n_rows``: the last ``n_rows`` rows of the prompt instead (all S if fewer): a
    cheaper probe, ``FlashPrefillConfig.vs_rows``) and p their exact causal softmax (cost: one
    query block of dense attention, as MInference estimates vertical and slash lines). Returns
    two (B, H, S) tensors, fp32 (fp64 for fp64 inputs):

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
    if n_rows is not None:
        if n_rows < 1:
            raise ValueError(f"vertical_slash_scores_reference: n_rows={n_rows} below 1")
        r0 = S - min(n_rows, S)
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
                                   block_size: int, threshold: float,
                                   n_rows: int | None = None
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Heavy key columns and diagonals as block flags, each (B, H, M) bool.

    ``column_blocks[j]``: key block j holds a key whose column score is >= threshold (a share
    of the probe rows' attention mass). ``diagonal_blocks[d]``: some offset o with diagonal
    score >= threshold makes query block i
    read key block i - d: o = c * block_size + m sends rows of block i to key blocks i - c
    (rows r >= m within the block) and i - c - 1 (rows r < m, when m > 0).
    """
    column, diagonal = vertical_slash_scores_reference(q, k, scale, block_size, n_rows)
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
