"""The dispatch layer: how one FlashPrefill call runs, given its tensors and its config.

Everything between the op registrations (``ops.py``) and the kernels (``kernels/``) lives
here, so a call's route is ops -> dispatch -> kernels and the config travels as one object:

* ``run(q, k, v, scale, config, layer)``: the whole op (dense below ``min_seq_len``, else the
  selection and block-sparse attention), on concrete or traced tensors;
* ``select(q, k, scale, config)``: the selection alone, compact, with the mass guard
  (``select_blocks`` and stats use it);
* ``attend(...)``: the attention over a selection, dense for the kv groups whose density is
  above ``config.dense_above`` (the host reads the groups' flags while the block-sparse kernel
  runs; skipped during CUDA-graph capture);
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
import itertools
from typing import Callable, Iterator, NamedTuple, Optional

import torch
import torch.nn.functional as F

from .config import FlashPrefillConfig
from .kernels import utils as ku
from .kernels.block_sparse_attention import block_sparse_attention_reference
from .kernels.pattern_search import select_mask_reference

_observers: list[Callable] = []

# When more than this share of a call's kv groups is above ``dense_above``, the whole call runs
# dense: on the H200 (RESULTS.md run 13, 8K tokens) a sparse call plus a dense call for 24 of 32
# heads took 1.67 ms where one dense call took 0.88 ms.
MOSTLY_DENSE = 0.5


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


class Selection(NamedTuple):
    """kv_num_blocks (B, H, M), kv_indices (B, H, M, M) int32; ``mass``: the estimated kept
    mass per row (B, H, M) fp32 when asked for (None otherwise)."""

    num: torch.Tensor
    idx: torch.Tensor
    mass: Optional[torch.Tensor] = None


def select_mask(q: torch.Tensor, k: torch.Tensor, scale: float, config: FlashPrefillConfig, *,
                return_mass: bool = False):
    """The reference selection as a dense (B, H, M, M) bool mask of kept blocks (+ the mass)."""
    return select_mask_reference(
        q, k, scale, config.block_size, config.alpha, config.sink_blocks, config.window_blocks,
        config.last_dense_blocks, config.gqa_shared, config.vertical_slash, config.vs_threshold,
        config.mass_floor, return_mass=return_mass)


def select(q: torch.Tensor, k: torch.Tensor, scale: float, config: FlashPrefillConfig, *,
           kmean: torch.Tensor | None = None, with_mass: bool = False) -> Selection:
    """Kept key blocks per query block (the mass guard included), compact.

    With the vertical/slash detector on, the GQA union is taken after it adds its blocks, as
    the reference does. ``kmean``: precomputed key-block means (mean correction shares them).
    """
    if not use_triton(q, config.kernel):
        keep, mass = select_mask(q, k, scale, config, return_mass=True)
        return Selection(*ku.compact_mask(keep), mass if with_mass else None)
    from .kernels.pattern_search import pattern_search

    num, idx, *mass = pattern_search(
        q, k, scale, config.block_size, config.alpha, config.sink_blocks, config.window_blocks,
        config.last_dense_blocks, gqa_shared=config.gqa_shared and not config.vertical_slash,
        kmean=kmean, mass_floor=config.mass_floor, return_mass=with_mass)
    if config.vertical_slash:
        from .kernels.vertical_slash import add_vertical_slash_compact

        num, idx = add_vertical_slash_compact(q, k, num, idx, scale, config.block_size,
                                              config.vs_threshold, gqa_shared=config.gqa_shared)
    return Selection(num, idx, mass[0] if mass else None)


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
    return _sdpa_causal(q, k, v, scale)


def _sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain causal SDPA, GQA k/v as they are (SDPA's own backend choice)."""
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
    from .kernels.block_sparse_attention import block_sparse_attention, capture_tile

    # No autotuning while a CUDA graph is captured (it would run and time candidates there)
    tile = capture_tile(q, config.block_size) if _capturing(q) else None
    return block_sparse_attention(q, k, v, num, idx, scale, config.block_size,
                                  mean_correction=config.mean_correction, kmean=kmean,
                                  vmean=vmean, tile=tile)


def _capturing(q: torch.Tensor) -> bool:
    return q.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def dense_groups(num: torch.Tensor, num_kv_heads: int, dense_above: float) -> torch.Tensor:
    """(B, Hkv) bool, on num's device: the kv groups that run dense, from kv_num_blocks
    (B, H, M): those whose kept density (mean over their query heads) is above
    ``dense_above``, or every group when more than ``MOSTLY_DENSE`` of them are."""
    B, H, M = num.shape
    kept = num.to(torch.float32).sum(dim=-1).view(B, num_kv_heads, H // num_kv_heads).mean(-1)
    flags = kept > dense_above * ku.causal_blocks(M)
    # Mostly dense: one dense call beats a sparse call plus dense calls on the rest.
    return flags | (flags.float().mean() > MOSTLY_DENSE)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           config: FlashPrefillConfig, sel: Selection, kmean=None, vmean=None
           ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Attention over the selection, dense for the kv groups where sparsity does not pay.

    Returns (out, dense (B, Hkv) bool on the host, or None when the decision was not taken).
    The groups are flagged on the device (``dense_groups``), the
    block-sparse kernel is launched at once with the flagged groups' rows emptied (it skips
    them), and only then does the host wait for the (B, Hkv) flags, copied asynchronously right
    after the search: the GPU runs the attention while the host waits, then the host launches
    dense attention for the flagged groups. Skipped while a CUDA graph is being captured (a
    capture cannot read device values): then every group runs block-sparse, exact but slower
    than dense where the density is high.
    """
    if config.dense_above >= 1 or _capturing(q):
        return sparse(q, k, v, scale, config, sel.num, sel.idx, kmean, vmean), None
    Hkv = k.shape[1]
    G = q.shape[1] // Hkv
    flags_dev = dense_groups(sel.num, Hkv, config.dense_above)
    if q.device.type == "cuda":
        flags = torch.empty(flags_dev.shape, dtype=torch.bool, pin_memory=True)
        flags.copy_(flags_dev, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
    else:
        flags, ready = flags_dev, None
    heads = flags_dev.repeat_interleave(G, dim=1)                    # (B, H)
    out = sparse(q, k, v, scale, config, sel.num.masked_fill(heads[..., None], 0), sel.idx,
                 kmean, vmean)
    if ready is not None:
        ready.synchronize()
    if bool(flags.all()):
        return dense(q, k, v, scale), flags
    for b, g0, g1 in _runs(flags):
        h0, h1 = g0 * G, g1 * G
        out[b:b + 1, h0:h1] = dense(q[b:b + 1, h0:h1], k[b:b + 1, g0:g1], v[b:b + 1, g0:g1],
                                    scale)
    return out, flags


def _runs(flags: torch.Tensor):
    """(b, g0, g1) for each run of consecutive True entries g0..g1-1 of row b of flags (B, n)."""
    for b, row in enumerate(flags.tolist()):
        g0 = 0
        for is_dense, run_ in itertools.groupby(row):
            g1 = g0 + len(list(run_))
            if is_dense:
                yield b, g0, g1
            g0 = g1


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
        config: FlashPrefillConfig, layer: int = -1) -> torch.Tensor:
    """The op: dense below ``config.min_seq_len``, else select + attention (block-sparse, or
    dense for the kv groups above ``config.dense_above``).

    ``layer`` is the SDPA call's layer number (-1: unknown), for stats and observers.
    """
    scale = ku.default_scale(q.shape[-1], scale)
    for fn in list(_observers):
        fn(layer, q, k, scale, config)
    if q.shape[2] < config.min_seq_len:
        if config.collect_stats:
            _record(layer, q, k, config, None, None)
        return dense(q, k, v, scale)
    kmean = vmean = None
    if config.mean_correction and use_triton(q, config.kernel):
        from .kernels.block_means import block_means

        # One pass over K and V gives the block statistics of both stages.
        kmean, vmean = block_means(k, config.block_size, v)
    sel = select(q, k, scale, config, kmean=kmean, with_mass=config.collect_stats)
    out, flags = attend(q, k, v, scale, config, sel, kmean, vmean)
    if config.collect_stats:
        _record(layer, q, k, config, sel, flags)
    return out


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
              config: FlashPrefillConfig) -> torch.Tensor:
    """The whole op in plain torch, whatever ``config.kernel`` says: what ``run`` must equal
    (outside CUDA-graph capture): dense below ``min_seq_len``; else the selection, block-sparse
    attention, and exact attention for the kv groups above ``dense_above``."""
    scale = ku.default_scale(q.shape[-1], scale)
    if q.shape[2] < config.min_seq_len:
        return _sdpa_causal(q, k, v, scale)
    num, idx = ku.compact_mask(select_mask(q, k, scale, config))
    flags = dense_groups(num, k.shape[1], config.dense_above)
    out = block_sparse_attention_reference(q, k, v, num, idx, scale, config.block_size,
                                           config.mean_correction)
    if bool(flags.any()):
        exact = _sdpa_causal(q, k, v, scale)
        heads = flags.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        out = torch.where(heads[:, :, None, None], exact, out)
    return out


def _record(layer: int, q: torch.Tensor, k: torch.Tensor, config: FlashPrefillConfig,
            sel: Optional[Selection], flags: Optional[torch.Tensor]) -> None:
    from .stats import record

    heads_dense = None
    if flags is not None:
        heads_dense = flags.repeat_interleave(q.shape[1] // k.shape[1], dim=1).any(dim=0)
    record(layer, q.shape[2], q.shape[0], config.block_size, config.alpha,
           None if sel is None else sel.num, q.shape[1],
           mass=None if sel is None else sel.mass, dense_heads=heads_dense)
