"""Registration of ``torch.ops.fp_compile.flash_prefill``.

The op is a ``torch.library.triton_op``: under torch.compile, AOT autograd decomposes it into its
body, so on CUDA Inductor sees the two Triton kernels (launched through ``wrap_triton``) and
writes them into its generated code; torch.export keeps the op whole.

On any other device the body calls ``fp_compile::flash_prefill_eager``, an opaque custom op that
runs the plain-torch reference (or the Triton kernels under TRITON_INTERPRET=1). Being opaque, it
is traced once with fake tensors and decides dense-vs-sparse at run time, with concrete shapes,
so no guard on the sequence length ever reaches the compiled graph. On CUDA the same opaque op
serves graphs with a symbolic sequence length (dynamic shapes); graphs with a static length get
the kernels inlined into Inductor's code.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch.library import custom_op, triton_op

from .config import FlashPrefillConfig
from .kernels import reference as ref

# Config fields passed to the op, in schema order (after q, k, v, scale).
OP_CONFIG_FIELDS = (
    "block_size", "alpha", "sink_blocks", "window_blocks", "last_dense_blocks", "min_seq_len",
    "kernel", "mean_correction", "gqa_shared", "collect_stats", "vertical_slash", "vs_threshold",
)


def op_config_args(config: FlashPrefillConfig) -> tuple:
    return tuple(getattr(config, name) for name in OP_CONFIG_FIELDS)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(device: torch.device, kernel: str) -> bool:
    """Whether the Triton kernels run for tensors on ``device`` under config.kernel."""
    if kernel == "reference":
        return False
    if kernel == "auto":
        return device.type == "cuda"
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(
            "FlashPrefillConfig(kernel='triton') on a non-CUDA tensor needs TRITON_INTERPRET=1 "
            "set before triton is imported; use kernel='auto' or 'reference' instead")
    return True


def select_triton(q, k, scale, block_size, alpha, sink_blocks, window_blocks, last_dense_blocks,
                  gqa_shared=False, vertical_slash=False, vs_threshold=0.015, kmean=None):
    """The selection with the Triton pattern search (+ the vertical/slash detector): compact
    (kv_num_blocks, kv_indices). With the detector, the GQA union is taken after it adds its
    blocks, as ``reference.select_mask_reference`` does."""
    from .kernels.pattern_search import pattern_search

    num, idx = pattern_search(q, k, scale, block_size, alpha, sink_blocks, window_blocks,
                              last_dense_blocks, gqa_shared=gqa_shared and not vertical_slash,
                              kmean=kmean)
    if vertical_slash:
        from .kernels.vertical_slash import add_vertical_slash_compact

        num, idx = add_vertical_slash_compact(q, k, num, idx, scale, block_size, vs_threshold,
                                              gqa_shared=gqa_shared)
    return num, idx


def _sparse_triton(q, k, v, scale, block_size, alpha, sink_blocks, window_blocks,
                   last_dense_blocks, mean_correction, gqa_shared, vertical_slash=False,
                   vs_threshold=0.015):
    from .kernels.block_sparse_attention import block_sparse_attention
    from .kernels.pattern_search import block_means

    kmean = vmean = None
    if mean_correction:
        # One pass over K and V gives the block statistics of both stages.
        kmean, vmean = block_means(k, block_size, v)
    num, idx = select_triton(q, k, scale, block_size, alpha, sink_blocks, window_blocks,
                             last_dense_blocks, gqa_shared, vertical_slash, vs_threshold, kmean)
    return block_sparse_attention(q, k, v, num, idx, scale, block_size,
                                  mean_correction=mean_correction, kmean=kmean, vmean=vmean)


def _dense_cuda(q, k, v, scale):
    """Dense causal attention for prompts below min_seq_len on CUDA.

    cuDNN where it applies: on the H200 it is the fastest dense causal kernel
    (benchmarks/RESULTS.md: 0.26 ms vs flash 0.50 ms at 4K). It is called directly because an
    ``sdpa_kernel`` priority set while the op is traced did not reach the compiled graph (run 4
    measured the flash kernel's time there). cuDNN takes k/v with fewer heads than q (GQA)
    as they are, so no copy. Other dtypes and head dims go to SDPA's own choice.
    """
    import torch.nn.functional as F

    D = q.shape[-1]
    if (q.dtype in (torch.float16, torch.bfloat16) and D % 8 == 0 and D <= 128
            and torch.backends.cudnn.is_available()
            and torch.cuda.get_device_capability(q.device) >= (9, 0)):
        return torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, False, 0.0, True, False, scale=scale)[0]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _record_stats(q, k, scale, block_size, alpha, sink_blocks, window_blocks,
                  last_dense_blocks, kernel, gqa_shared, layer, sparse, vertical_slash=False,
                  vs_threshold=0.015):
    """collect_stats=True only: run the selection once more and store per-head density."""
    from .api import select_blocks
    from .stats import record

    num = None
    if sparse:
        config = FlashPrefillConfig(block_size=block_size, alpha=alpha, sink_blocks=sink_blocks,
                                    window_blocks=window_blocks,
                                    last_dense_blocks=last_dense_blocks, kernel=kernel,
                                    gqa_shared=gqa_shared, vertical_slash=vertical_slash,
                                    vs_threshold=vs_threshold)
        num = select_blocks(q, k, scale=scale, config=config).kv_num_blocks
    record(layer, q.shape[2], q.shape[0], block_size, alpha, num, q.shape[1])


def _run(q, k, v, scale, block_size, alpha, sink_blocks, window_blocks, last_dense_blocks,
         min_seq_len, kernel, mean_correction, gqa_shared, collect_stats, layer=-1,
         vertical_slash=False, vs_threshold=0.015):
    """The op on concrete tensors of any device (eager)."""
    scale = ref.default_scale(q.shape[-1], scale)
    if collect_stats:
        _record_stats(q, k, scale, block_size, alpha, sink_blocks, window_blocks,
                      last_dense_blocks, kernel, gqa_shared, layer, q.shape[2] >= min_seq_len,
                      vertical_slash, vs_threshold)
    if q.shape[2] < min_seq_len:
        if q.device.type == "cuda":
            return _dense_cuda(q, k, v, scale)
        return ref.dense_causal_attention(q, k, v, scale)
    if use_triton(q.device, kernel):
        return _sparse_triton(q, k, v, scale, block_size, alpha, sink_blocks, window_blocks,
                              last_dense_blocks, mean_correction, gqa_shared, vertical_slash,
                              vs_threshold)
    return ref.flash_prefill_reference(q, k, v, scale, block_size, alpha, sink_blocks,
                                       window_blocks, last_dense_blocks, 0, mean_correction,
                                       gqa_shared, vertical_slash, vs_threshold)


@custom_op("fp_compile::flash_prefill_eager", mutates_args=())
def flash_prefill_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        scale: Optional[float], block_size: int, alpha: float, sink_blocks: int,
                        window_blocks: int, last_dense_blocks: int, min_seq_len: int,
                        kernel: str, mean_correction: bool, gqa_shared: bool,
                        collect_stats: bool, vertical_slash: bool = False,
                        vs_threshold: float = 0.015, layer: int = -1) -> torch.Tensor:
    # The fake kernel promises a contiguous output; the reference (and SDPA for short prompts)
    # follow q's layout, which is a transposed view in most models.
    return _run(q, k, v, scale, block_size, alpha, sink_blocks, window_blocks,
                last_dense_blocks, min_seq_len, kernel, mean_correction, gqa_shared,
                collect_stats, layer, vertical_slash, vs_threshold).contiguous()


@flash_prefill_eager.register_fake
def _(q, k, v, *args):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@triton_op("fp_compile::flash_prefill", mutates_args=())
def flash_prefill_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     scale: Optional[float], block_size: int, alpha: float, sink_blocks: int,
                     window_blocks: int, last_dense_blocks: int, min_seq_len: int, kernel: str,
                     mean_correction: bool, gqa_shared: bool,
                     collect_stats: bool, vertical_slash: bool = False,
                     vs_threshold: float = 0.015, layer: int = -1) -> torch.Tensor:
    """FlashPrefill causal attention. q (B, H, S, D); k, v (B, Hkv, S, D); returns (B, H, S, D).

    ``layer`` is the index of this SDPA call in the model (-1: unknown), for per-layer stats.
    """
    args = (scale, block_size, alpha, sink_blocks, window_blocks, last_dense_blocks,
            min_seq_len, kernel, mean_correction, gqa_shared, collect_stats, vertical_slash,
            vs_threshold, layer)
    if q.device.type != "cuda" or kernel == "reference" or collect_stats:
        return torch.ops.fp_compile.flash_prefill_eager(q, k, v, *args)
    if not isinstance(q.shape[2] < min_seq_len, bool):
        # Symbolic length (dynamic shapes): decide at run time, with the concrete length, inside
        # the opaque op, so no guard on S enters the graph and one compiled graph serves short
        # (dense) and long (sparse) prompts. (torch.cond would keep the kernels in Inductor's
        # code, but in torch 2.11 its Inductor lowering rejects the lifted size symbols, and
        # dynamo rejects k/v that are views of one tensor.) The kernels then launch from the
        # op's Python: no host synchronisation, so CUDA graphs still capture it.
        return torch.ops.fp_compile.flash_prefill_eager(q, k, v, *args)
    # Static length: the same dispatch as the eager op, traced, so the kernels' wrap_triton
    # launches land in Inductor's code.
    return _run(q, k, v, scale, block_size, alpha, sink_blocks, window_blocks, last_dense_blocks,
                min_seq_len, kernel, mean_correction, gqa_shared, collect_stats, layer,
                vertical_slash, vs_threshold)
