"""Vertical/slash detector: adds the key blocks of heavy columns and diagonals to a selection.

Mean-pooled block scores dilute one heavy key by the block size, so FlashPrefill's pattern
search misses attention-sink-like columns and slash lines. This stage looks at the exact
attention of the last query block (one block of dense attention per head), flags key blocks
holding a heavy column and diagonal block offsets holding a heavy diagonal
(``reference.vertical_slash_flags_reference``, (B, H, M) each), and ORs them into the compact
selection of the pattern search.

Status: plain torch on every device (kv head by kv head, so scratch is O(G * block * S) per
step; no S x S tensor, no host synchronisation). A Triton kernel for the probe is future work.
"""

from __future__ import annotations

import torch

from . import reference as ref


def vertical_slash_flags(q: torch.Tensor, k: torch.Tensor, scale: float, block_size: int,
                         threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(column_blocks, diagonal_blocks), each (B, H, M) bool; computed one kv head at a time."""
    Hkv = k.shape[1]
    G = q.shape[1] // Hkv
    cols, diags = [], []
    for h in range(Hkv):
        c, d = ref.vertical_slash_flags_reference(q[:, h * G:(h + 1) * G], k[:, h:h + 1], scale,
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
    keep = ref.expand_indices(kv_num_blocks, kv_indices)
    keep = ref.add_vertical_slash(keep, *vertical_slash_flags(q, k, scale, block_size, threshold))
    if gqa_shared:
        keep = ref.gqa_union(keep, k.shape[1])
    return ref.compact_mask(keep)
