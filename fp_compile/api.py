"""Eager entry points: ``flash_prefill`` (like SDPA with is_causal=True) and ``select_blocks``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import dispatch
from .config import FlashPrefillConfig
from .kernels import utils as ku
from .ops import op_config_args
from .passes.eligibility import check_inputs

__all__ = ["BlockSelection", "check_inputs", "flash_prefill", "select_blocks"]


def flash_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                  scale: float | None = None, enable_gqa: bool = False,
                  config: FlashPrefillConfig | None = None,
                  key_mask: torch.Tensor | None = None, q_pos: torch.Tensor | None = None,
                  return_lse: bool = False):
    """FlashPrefill causal attention, with ``F.scaled_dot_product_attention``'s conventions.

    Equivalent to ``F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
    enable_gqa=enable_gqa)`` up to the blocks the pattern search drops.
    q (B, H, S_q, D); k, v (B, Hkv, S_kv, D); returns (B, H, S_q, D) in q's dtype.

    Beyond the textbook call (``spans``): S_q < S_kv puts the queries at the last S_q key
    positions (a cached prefix; bottom-right causal alignment); ``q_pos`` (S_q,) consecutive
    positions put them elsewhere (a static cache buffer longer than the prompt);
    ``key_mask`` (B, S_kv), nonzero where a key is valid (a padded batch's attention_mask:
    one contiguous run per row). Rows that see no key give 0, as SDPA does.
    ``return_lse``: return (out, lse), lse (B, H, S_q) fp32 the natural log-sum-exp of each
    row's scores, to merge results computed over parts of the keys.
    """
    config = config or FlashPrefillConfig()
    span = key_mask is not None or q_pos is not None or return_lse or q.shape[2] != k.shape[2]
    # plain comparisons (provable=False): dynamo traces them when flash_prefill is compiled
    check_inputs(q, k, v, enable_gqa=enable_gqa, provable=False, span=span)
    args = (q, k, v, scale, *op_config_args(config), -1, key_mask, q_pos)
    if return_lse:
        return torch.ops.fp_compile.flash_prefill_lse(*args)
    return torch.ops.fp_compile.flash_prefill(*args)


@dataclass(frozen=True)
class BlockSelection:
    """Kept key blocks per query block, in FlexAttention's BlockMask layout.

    kv_num_blocks (B, H, M) int32; kv_indices (B, H, M, M) int32, rows ascending, entries past
    the count are 0. ``kept_mass`` (B, H, M) fp32: the search's estimate of the attention mass
    each query block keeps (share of its normalised block scores before the diagonal; 1 for
    dense rows), the quantity the mass guard holds above ``mass_floor``.
    """

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    block_size: int
    seq_len: int
    kept_mass: torch.Tensor | None = None

    @property
    def num_blocks(self) -> int:
        return self.kv_indices.shape[-1]

    @property
    def density(self) -> float:
        """Kept causal blocks / all causal blocks."""
        total = self.kv_num_blocks.numel() / self.num_blocks * ku.causal_blocks(self.num_blocks)
        return float(self.kv_num_blocks.sum().item()) / total

    def to_dense(self) -> torch.Tensor:
        """(B, H, M, M) bool mask of kept blocks."""
        return ku.expand_indices(self.kv_num_blocks, self.kv_indices)

    def recall(self, q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> float:
        """Share of the exact causal softmax mass inside the kept blocks.

        Averaged over batch, heads and query rows; q (B, H, S, D), k (B, Hkv, S, D), the
        tensors the selection was made from. Computed in chunks of rows (bounded memory).
        """
        from .accuracy import mask_recall

        scale = ku.default_scale(q.shape[-1], scale)
        return float(mask_recall(q, k, self.to_dense(), scale, self.block_size).mean())

    def to_block_mask(self):
        """A FlexAttention ``BlockMask`` with a causal mask_mod over the same kept blocks.

        Blocks strictly below the diagonal are passed as full blocks (no mask_mod applied), the
        diagonal as partial, which is the fastest form FlexAttention accepts.
        """
        from torch.nn.attention.flex_attention import BlockMask

        keep = self.to_dense()
        M = self.num_blocks
        diag = torch.eye(M, dtype=torch.bool, device=keep.device)
        full_num, full_idx = ku.compact_mask(keep & ~diag)
        part_num, part_idx = ku.compact_mask(keep & diag)

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        return BlockMask.from_kv_blocks(part_num, part_idx, full_num, full_idx,
                                        BLOCK_SIZE=self.block_size, mask_mod=causal,
                                        seq_lengths=(self.seq_len, self.seq_len))


def select_blocks(q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None,
                  config: FlashPrefillConfig | None = None) -> BlockSelection:
    """Run FlashPrefill's pattern search alone. q (B, H, S, D), k (B, Hkv, S, D).

    Uses the Triton kernel where the config's ``kernel`` says so, the reference otherwise.
    ``min_seq_len`` does not apply here: the selection is always computed.
    """
    config = config or FlashPrefillConfig()
    check_inputs(q, k, provable=False)
    sel = dispatch.select(q, k, ku.default_scale(q.shape[-1], scale), config, with_mass=True)
    return BlockSelection(sel.num, sel.idx, config.block_size, q.shape[2], sel.mass)
