"""Vertical/slash detector: adds the key blocks of heavy columns and diagonals to a selection.

Mean-pooled block scores dilute one heavy key by the block size, so FlashPrefill's pattern
search misses attention-sink-like columns and slash lines. This stage looks at the exact
attention of the last query block (one block of dense attention per head), flags key blocks
holding a heavy column and diagonal block offsets holding a heavy diagonal
(``vertical_slash_flags_reference``, (B, H, M) each), and ORs them into the compact
selection of the pattern search.

Status: plain torch on every device (kv head by kv head, so scratch is O(G * block * S) per
step; no S x S tensor, no host synchronisation). A Triton kernel for the probe is future work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .utils import acc_dtype, cdiv, compact_mask, expand_indices, gqa_union, group_view


def vertical_slash_flags(q: torch.Tensor, k: torch.Tensor, scale: float, block_size: int,
                         threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(column_blocks, diagonal_blocks), each (B, H, M) bool; computed one kv head at a time."""
    Hkv = k.shape[1]
    G = q.shape[1] // Hkv
    cols, diags = [], []
    for h in range(Hkv):
        c, d = vertical_slash_flags_reference(q[:, h * G:(h + 1) * G], k[:, h:h + 1], scale,
                                              block_size, threshold)
        cols.append(c)
        diags.append(d)
    return torch.cat(cols, dim=1), torch.cat(diags, dim=1)


def add_vertical_slash_compact(q: torch.Tensor, k: torch.Tensor, kv_num_blocks: torch.Tensor,
                               kv_indices: torch.Tensor, scale: float, block_size: int,
                               threshold: float, gqa_shared: bool = False
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Selection (kv_num_blocks (B, H, M), kv_indices (B, H, M, M)) plus heavy columns/diagonals.

    With ``gqa_shared`` the union over each kv group is taken after the addition, as
    ``select_mask_reference`` does.
    """
    keep = expand_indices(kv_num_blocks, kv_indices)
    keep = add_vertical_slash(keep, *vertical_slash_flags(q, k, scale, block_size, threshold))
    if gqa_shared:
        keep = gqa_union(keep, k.shape[1])
    return compact_mask(keep)


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
    B, H, S, D = q.shape
    M = cdiv(S, block_size)
    column, diagonal = vertical_slash_scores_reference(q, k, scale, block_size)
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
