"""Eager entry points: ``flash_prefill`` (like SDPA with is_causal=True) and ``select_blocks``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import FlashPrefillConfig
from .kernels import reference as ref
from .ops import op_config_args, select_triton, use_triton

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None, *,
                 enable_gqa: bool = True) -> None:
    """Raise TypeError/ValueError naming the problem for inputs the op cannot take."""
    named = [("query", q), ("key", k)] + ([("value", v)] if v is not None else [])
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"flash_prefill: {name} must be a Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"flash_prefill: {name} must be a floating tensor "
                            f"(float16/bfloat16/float32/float64), got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"flash_prefill: {name} must be 4-D (B, H, S, D), got shape "
                             f"{tuple(t.shape)}")
    for name, t in named[1:]:
        if t.dtype != q.dtype:
            raise TypeError(f"flash_prefill: {name} dtype {t.dtype} differs from query dtype "
                            f"{q.dtype}")
        if t.device != q.device:
            raise ValueError(f"flash_prefill: {name} is on {t.device} but query is on {q.device}")
        if t.shape[0] != q.shape[0]:
            raise ValueError(f"flash_prefill: batch size of {name} ({t.shape[0]}) differs from "
                             f"query ({q.shape[0]})")
        if t.shape[-1] != q.shape[-1]:
            raise ValueError(f"flash_prefill: head dim of {name} ({t.shape[-1]}) differs from "
                             f"query ({q.shape[-1]})")
        if t.shape[2] != q.shape[2]:
            raise ValueError(f"flash_prefill: prefill needs S_q == S_kv; query has "
                             f"{q.shape[2]} tokens, {name} has {t.shape[2]}")
    if v is not None and v.shape[1] != k.shape[1]:
        raise ValueError(f"flash_prefill: key has {k.shape[1]} heads, value {v.shape[1]}")
    H, Hkv = q.shape[1], k.shape[1]
    if H != Hkv and not enable_gqa:
        raise ValueError(f"flash_prefill: query has {H} heads and key {Hkv}; pass "
                         "enable_gqa=True for grouped-query attention")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"flash_prefill: query heads ({H}) must be a multiple of key/value "
                         f"heads ({Hkv})")
    if q.shape[2] == 0:
        raise ValueError("flash_prefill: sequence length must be at least 1")


def flash_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                  scale: float | None = None, enable_gqa: bool = False,
                  config: FlashPrefillConfig | None = None) -> torch.Tensor:
    """FlashPrefill causal attention, with ``F.scaled_dot_product_attention``'s conventions.

    Equivalent to ``F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
    enable_gqa=enable_gqa)`` up to the blocks the pattern search drops.
    q (B, H, S, D); k, v (B, Hkv, S, D); returns (B, H, S, D) in q's dtype.
    """
    config = config or FlashPrefillConfig()
    check_inputs(q, k, v, enable_gqa=enable_gqa)
    return torch.ops.fp_compile.flash_prefill(q, k, v, scale, *op_config_args(config))


@dataclass(frozen=True)
class BlockSelection:
    """Kept key blocks per query block, in FlexAttention's BlockMask layout.

    kv_num_blocks (B, H, M) int32; kv_indices (B, H, M, M) int32, rows ascending, entries past
    the count are 0.
    """

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    block_size: int
    seq_len: int

    @property
    def num_blocks(self) -> int:
        return self.kv_indices.shape[-1]

    @property
    def density(self) -> float:
        """Kept causal blocks / all causal blocks."""
        M = self.num_blocks
        total = self.kv_num_blocks.numel() * (M + 1) / 2
        return float(self.kv_num_blocks.sum().item()) / total

    def to_dense(self) -> torch.Tensor:
        """(B, H, M, M) bool mask of kept blocks."""
        return ref.expand_indices(self.kv_num_blocks, self.kv_indices)

    def recall(self, q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> float:
        """Share of the exact causal softmax mass inside the kept blocks.

        Averaged over batch, heads and query rows; q (B, H, S, D), k (B, Hkv, S, D), the
        tensors the selection was made from. Computed in chunks of rows (bounded memory).
        """
        from .accuracy import mask_recall

        scale = ref.default_scale(q.shape[-1], scale)
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
        full_num, full_idx = ref.compact_mask(keep & ~diag)
        part_num, part_idx = ref.compact_mask(keep & diag)

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
    check_inputs(q, k)
    scale = ref.default_scale(q.shape[-1], scale)
    args = (scale, config.block_size, config.alpha, config.sink_blocks, config.window_blocks,
            config.last_dense_blocks)
    if use_triton(q.device, config.kernel):
        num, idx = select_triton(q, k, *args, gqa_shared=config.gqa_shared,
                                 vertical_slash=config.vertical_slash,
                                 vs_threshold=config.vs_threshold)
    else:
        num, idx = ref.compact_mask(ref.select_mask_reference(
            q, k, *args, gqa_shared=config.gqa_shared, vertical_slash=config.vertical_slash,
            vs_threshold=config.vs_threshold))
    return BlockSelection(num, idx, config.block_size, q.shape[2])
