"""The dispatch layer: how one FlashPrefill call runs, given its tensors and its config.

Everything between the op registrations (``ops.py``) and the kernels (``kernels/``) lives
here, so a call's route is ops -> dispatch -> kernels and the config travels as one object:

* ``run(q, k, v, scale, config, layer)``: the whole op (dense below ``min_seq_len``, else the
  selection and block-sparse attention), on concrete or traced tensors;
* ``select(q, k, scale, config)``: the selection alone, compact (``select_blocks``, stats and
  ``calibrate`` use it);
* ``dense(q, k, v, scale)``: the dense causal path (cuDNN on Hopper);
* ``observe(fn)``: a context in which every ``run`` reports (layer, q, k, scale, config) to
  ``fn`` before computing (``calibrate`` sees the same calls, numbered the same way, as the
  pass rewrites).

Which implementation runs: ``config.kernel`` "triton" / "auto" on CUDA takes the Triton
kernels for fp16/bf16/fp32; "reference", other devices under "auto", and float64 take the
plain-torch references, which define what the kernels compute.

Layouts: q (B, H, S, D); k, v (B, Hkv, S, D), H % Hkv == 0; out (B, H, S, D).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .config import FlashPrefillConfig
from .kernels import utils as ku
from .kernels.block_sparse_attention import block_sparse_attention_reference
from .kernels.pattern_search import select_mask_reference

_observers: list[Callable] = []


def use_triton(q: torch.Tensor, kernel: str) -> bool:
    """Whether the Triton kernels serve ``q`` under ``config.kernel``."""
    if kernel == "reference" or q.dtype not in ku.KERNEL_DTYPES:
        return False
    if kernel == "auto":
        return q.device.type == "cuda"
    if q.device.type != "cuda" and not ku.interpreting():
        raise RuntimeError(
            "FlashPrefillConfig(kernel='triton') on a non-CUDA tensor needs TRITON_INTERPRET=1 "
            "set before triton is imported; use kernel='auto' or 'reference' instead")
    return True


@contextlib.contextmanager
def observe(fn: Callable) -> Iterator[None]:
    """Call ``fn(layer, q, k, scale, config)`` at the start of every ``run`` in this context."""
    _observers.append(fn)
    try:
        yield
    finally:
        _observers.remove(fn)


def select_mask(q: torch.Tensor, k: torch.Tensor, scale: float,
                config: FlashPrefillConfig) -> torch.Tensor:
    """The reference selection as a dense (B, H, M, M) bool mask of kept blocks."""
    return select_mask_reference(
        q, k, scale, config.block_size, config.alpha, config.sink_blocks, config.window_blocks,
        config.last_dense_blocks, config.gqa_shared, config.vertical_slash, config.vs_threshold)


def select(q: torch.Tensor, k: torch.Tensor, scale: float, config: FlashPrefillConfig, *,
           kmean: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept key blocks per query block: kv_num_blocks (B, H, M), kv_indices (B, H, M, M) int32.

    With the vertical/slash detector on, the GQA union is taken after it adds its blocks, as
    the reference does. ``kmean``: precomputed key-block means (mean correction shares them).
    """
    if not use_triton(q, config.kernel):
        return ku.compact_mask(select_mask(q, k, scale, config))
    from .kernels.pattern_search import pattern_search

    num, idx = pattern_search(
        q, k, scale, config.block_size, config.alpha, config.sink_blocks, config.window_blocks,
        config.last_dense_blocks, gqa_shared=config.gqa_shared and not config.vertical_slash,
        kmean=kmean)
    if config.vertical_slash:
        from .kernels.vertical_slash import add_vertical_slash_compact

        num, idx = add_vertical_slash_compact(q, k, num, idx, scale, config.block_size,
                                              config.vs_threshold, gqa_shared=config.gqa_shared)
    return num, idx


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense causal attention: the path below ``min_seq_len`` and the tests' ground truth.

    On Hopper cuDNN where it applies: the fastest dense causal kernel on the H200
    (benchmarks/RESULTS.md: 0.26 ms vs flash 0.50 ms at 4K). It is called directly because an
    ``sdpa_kernel`` priority set while the op is traced did not reach the compiled graph
    (run 4 measured the flash kernel's time there). cuDNN takes GQA k/v as they are.
    """
    D = q.shape[-1]
    if (q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16)
            and D % 8 == 0 and D <= 128 and torch.backends.cudnn.is_available()
            and torch.cuda.get_device_capability(q.device) >= (9, 0)):
        return torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, False, 0.0, True, False, scale=scale)[0]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           config: FlashPrefillConfig, num: torch.Tensor, idx: torch.Tensor,
           kmean: torch.Tensor | None = None, vmean: torch.Tensor | None = None
           ) -> torch.Tensor:
    """Block-sparse attention over the selection (num, idx)."""
    if not use_triton(q, config.kernel):
        return block_sparse_attention_reference(q, k, v, num, idx, scale, config.block_size,
                                                config.mean_correction)
    from .kernels.block_sparse_attention import block_sparse_attention

    return block_sparse_attention(q, k, v, num, idx, scale, config.block_size,
                                  mean_correction=config.mean_correction, kmean=kmean,
                                  vmean=vmean)


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
        config: FlashPrefillConfig, layer: int = -1) -> torch.Tensor:
    """The op: dense below ``config.min_seq_len``, else select + block-sparse attention.

    ``layer`` is the SDPA call's index in the model (-1: unknown), for stats and observers.
    """
    scale = ku.default_scale(q.shape[-1], scale)
    for fn in list(_observers):
        fn(layer, q, k, scale, config)
    is_sparse = q.shape[2] >= config.min_seq_len
    if not is_sparse:
        if config.collect_stats:
            _record(layer, q, config, None)
        return dense(q, k, v, scale)
    kmean = vmean = None
    if config.mean_correction and use_triton(q, config.kernel):
        from .kernels.block_means import block_means

        # One pass over K and V gives the block statistics of both stages.
        kmean, vmean = block_means(k, config.block_size, v)
    num, idx = select(q, k, scale, config, kmean=kmean)
    if config.collect_stats:
        _record(layer, q, config, num)
    return sparse(q, k, v, scale, config, num, idx, kmean, vmean)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
              config: FlashPrefillConfig) -> torch.Tensor:
    """The whole op in plain torch, whatever ``config.kernel`` says: what ``run`` must equal."""
    scale = ku.default_scale(q.shape[-1], scale)
    if q.shape[2] < config.min_seq_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    num, idx = ku.compact_mask(select_mask(q, k, scale, config))
    return block_sparse_attention_reference(q, k, v, num, idx, scale, config.block_size,
                                            config.mean_correction)


def _record(layer: int, q: torch.Tensor, config: FlashPrefillConfig,
            num: torch.Tensor | None) -> None:
    from .stats import record

    record(layer, q.shape[2], q.shape[0], config.block_size, config.alpha, num, q.shape[1])
