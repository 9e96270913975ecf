"""Helpers shared by the kernels and their references: sizes, dtypes, layouts of a selection.

Layouts: q (B, H, S, D); k, v (B, Hkv, S, D) with H % Hkv == 0. A selection is either a dense
bool mask ``keep`` (B, H, M, M) or FlexAttention's compact form ``kv_num_blocks`` (B, H, M)
int32 + ``kv_indices`` (B, H, M, M) int32, rows ascending, entries past the count 0.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch

LOG2E = 1.4426950408889634

# Upper bound on the fp32 scratch one chunk of a reference's logits may take (bytes).
CHUNK_BYTES = 256 * 1024 * 1024

# The dtypes the Triton kernels take; float64 goes to the references (the dispatch decides).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def launcher(kernel):
    """``kernel`` ready to launch as ``launcher(kernel)[grid](...)``.

    While torch.compile, export or make_fx trace the call, ``torch.library.wrap_triton`` makes
    the launch visible to them (Inductor writes the kernel into its code). Called eagerly (the
    opaque op, the eager API), the kernel is launched without wrap_triton, whose eager dispatch
    costs host time that shows on the GPU wherever the host has just waited for it (the dense
    fallback's decision: +0.43 ms at 32K and +0.88 ms at 128K on the H200, RESULTS.md run 15),
    and through ``fast_launch.launch``, which skips Triton's per-call binding once a kernel is
    compiled for the call's key. In Triton's interpreter the kernel is launched as it is.
    """
    from torch.library import wrap_triton

    if tracing():
        return wrap_triton(kernel)
    if interpreting():
        return kernel
    from .fast_launch import launch

    return launch(kernel)


def tracing() -> bool:
    """Whether torch.compile, export or make_fx is tracing the current call (dynamo compiling,
    or a torch dispatch mode such as the fake / proxy modes active), rather than running it."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


@functools.lru_cache(maxsize=None)
def hopper(device: torch.device) -> bool:
    """Whether ``device`` is a CUDA GPU of compute capability 9.0 or later (cached: the query
    costs host time on every call otherwise)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (TRITON_INTERPRET=1, read at triton import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def default_scale(head_dim: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(t.dtype, torch.float32)


def check_kernel_dtype(q: torch.Tensor, what: str) -> None:
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{what}: the Triton kernel takes float16/bfloat16/float32, got "
                        f"{q.dtype} (the reference path serves other dtypes)")


def group_view(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(B, H, S, D) -> (B, Hkv, G, S, D) without a copy when q's head dim is contiguous."""
    return q.unflatten(1, (num_kv_heads, q.shape[1] // num_kv_heads))


def rows_per_chunk(B: int, H: int, width: int, multiple: int) -> int:
    """Query rows per chunk so that (B, H, rows, width) fp32 logits stay under CHUNK_BYTES."""
    rows = max(1, CHUNK_BYTES // max(1, B * H * width * 4))
    return max(multiple, rows // multiple * multiple)


def causal_blocks(M: int) -> int:
    """Number of (query block, key block) pairs with j <= i."""
    return M * (M + 1) // 2


def gqa_union(keep: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """keep (B, H, n, M) with each query head's row set to the union over its kv group."""
    B, H, n, M = keep.shape
    if H == num_kv_heads:
        return keep
    G = H // num_kv_heads
    union = keep.unflatten(1, (num_kv_heads, G)).any(dim=2, keepdim=True)
    return union.expand(B, num_kv_heads, G, n, M).flatten(1, 2).contiguous()


def compact_mask(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (B, H, M, M) bool -> (kv_num_blocks (B, H, M) int32, kv_indices (B, H, M, M) int32).

    Each row of kv_indices lists its kept key blocks ascending; entries past the count are 0.
    """
    M = keep.shape[-1]
    j = torch.arange(M, device=keep.device)
    order = torch.where(keep, j, j + M).argsort(dim=-1)
    num = keep.sum(dim=-1, dtype=torch.int32)
    idx = torch.where(j < num[..., None], order, torch.zeros_like(order))
    return num, idx.to(torch.int32)


def expand_indices(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor) -> torch.Tensor:
    """Compact form -> dense (B, H, M, M) bool mask."""
    M = kv_indices.shape[-1]
    valid = torch.arange(M, device=kv_indices.device) < kv_num_blocks[..., None]
    keep = torch.zeros(kv_indices.shape, dtype=torch.bool, device=kv_indices.device)
    keep.scatter_(-1, kv_indices.long(), valid)
    # scatter of a False from an unused slot must not clear a kept block 0
    keep[..., 0] |= (valid & (kv_indices == 0)).any(dim=-1)
    return keep


class Span(NamedTuple):
    """Where a call's queries and valid keys lie: padded batches, cached prefixes, KV buffers.

    p0: int32 (1,) tensor, the key position of query row 0 (queries sit at p0 .. p0 + S_q - 1;
    bottom-right alignment is p0 = S_kv - S_q). ks, ke: int32 (B,) tensors, the valid keys of
    batch row b are ks[b] <= j < ke[b]. Key j is visible to query row r of batch row b iff
    ks[b] <= j < ke[b] and j <= p0 + r; a row that sees no key outputs 0 (SDPA's answer for a
    fully masked row). All three stay on the device: no host read, CUDA graphs capture them.
    The caller guarantees 0 <= ks <= ke <= S_kv and 0 <= p0 <= S_kv - S_q.
    """
    p0: torch.Tensor
    ks: torch.Tensor
    ke: torch.Tensor


def span_rows(S_q: int, block_size: int) -> int:
    """Selection rows of a call with a span: the query blocks p0 // block_size onwards that its
    queries can touch (one more than ceil(S_q / block_size), as p0 need not be block-aligned)."""
    return cdiv(S_q, block_size) + 1


def span_visible(span: Span, S_q: int, S: int) -> torch.Tensor:
    """(B, S_q, S) bool: which keys each query row sees (the definition the kernels follow)."""
    device = span.ks.device
    rows = span.p0.to(device).long().reshape(()) + torch.arange(S_q, device=device)
    cols = torch.arange(S, device=device)
    valid = (cols >= span.ks.long()[:, None]) & (cols < span.ke.long()[:, None])   # (B, S)
    return valid[:, None, :] & (cols[None, :] <= rows[:, None])[None]
