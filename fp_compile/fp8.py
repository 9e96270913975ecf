"""The FP8 attention option (``FlashPrefillConfig.fp8_attention``): what inputs it takes, and
the glue from the dispatch to the FP8 kernels (``kernels/fp8_quant``,
``kernels/block_sparse_attention_fp8``) or, off the Triton path, to their references.

Only the block-sparse attention changes: the search, short prompts (dense SDPA) and the
dense fallback's groups run in q's dtype as without the option.

Layouts: q (B, H, S_q, D); k, v (B, Hkv, S, D); out (B, H, S_q, D) in q's dtype.
"""

from __future__ import annotations

import torch

from .config import FlashPrefillConfig
from .kernels.block_sparse_attention_fp8 import (block_sparse_attention_fp8,
                                                 block_sparse_attention_fp8_reference,
                                                 check_fp8_shapes)
from .kernels.fp8_quant import Fp8Blocks, quantize_blocks, quantize_blocks_reference

FP8_INPUT_DTYPES = (torch.float16, torch.bfloat16)


def check_inputs(q: torch.Tensor, config: FlashPrefillConfig) -> None:
    """ValueError when ``config.fp8_attention`` is on and q cannot take it: the same rule on
    every device and kernel, so a config that runs on the CPU runs on the GPU."""
    if not config.fp8_attention:
        return
    what = "flash_prefill: FlashPrefillConfig.fp8_attention=True"
    if q.dtype not in FP8_INPUT_DTYPES:
        raise ValueError(f"{what} needs float16 or bfloat16 q, k, v, got {q.dtype}")
    check_fp8_shapes(config.block_size, q.shape[-1], what)
    if config.mean_correction:
        raise ValueError(f"{what} does not support mean_correction=True")


def quantize_kv(k: torch.Tensor, v: torch.Tensor, config: FlashPrefillConfig,
                triton: bool) -> tuple[Fp8Blocks, Fp8Blocks]:
    """k and v per key block (v in the transposed layout), with the Triton kernel or its
    reference."""
    quant = quantize_blocks if triton else quantize_blocks_reference
    return quant(k, config.block_size), quant(v, config.block_size, transpose=True)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           config: FlashPrefillConfig, num: torch.Tensor, idx: torch.Tensor, *, triton: bool,
           out: torch.Tensor | None = None, q_start: int = 0,
           kv: tuple[Fp8Blocks, Fp8Blocks] | None = None) -> torch.Tensor:
    """Block-sparse attention over the selection (num, idx) in FP8: quantise q (and k, v unless
    ``kv`` holds them already, from ``quantize_kv``), then the FP8 kernel (``triton``) or its
    reference. ``out`` / ``q_start`` as for ``block_sparse_attention``."""
    bs = config.block_size
    k8, v8 = kv if kv is not None else quantize_kv(k, v, config, triton)
    if not triton:
        res = block_sparse_attention_fp8_reference(quantize_blocks_reference(q, bs), k8, v8,
                                                   num, idx, scale, bs, q.dtype, q_start)
        return res if out is None else out.copy_(res)
    if out is None:
        out = q.new_empty(q.shape)
    return block_sparse_attention_fp8(quantize_blocks(q, bs), k8, v8, num, idx, scale, bs,
                                      out, q_start=q_start)
