"""The selection front of the dispatch layer: which implementation serves a call, and the
kept key blocks of a whole call (``select``), compact, with the mass guard and the line
detectors' blocks (the vertical/slash detector, the slash probe). ``dispatch`` re-exports every
name here; the chunked selection of long prompts, the dense decision and the attention stay in
``dispatch``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .config import FlashPrefillConfig
from .kernels import utils as ku
from .kernels.pattern_search import select_mask_reference


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
        config.mass_floor, return_mass=return_mass, slash_probe=config.slash_probe,
        vs_rows=config.vs_rows, search_stride=config.search_stride)


def select(q: torch.Tensor, k: torch.Tensor, scale: float, config: FlashPrefillConfig, *,
           kmean: torch.Tensor | None = None, with_mass: bool = False,
           vs_blocks: tuple[torch.Tensor, torch.Tensor] | None = None) -> Selection:
    """Kept key blocks per query block (the mass guard included), compact.

    With the vertical/slash detector on, the GQA union is taken after it adds its blocks, as
    the reference does: the Triton search ORs the detector's flags into each head's kept set
    before the union, so no (B, H, M, M) mask is ever built. ``kmean``: precomputed key-block
    means (mean correction shares them); ``vs_blocks``: the flags when the caller has them
    already (``vs_flags``).
    """
    if not use_triton(q, config.kernel):
        keep, mass = select_mask(q, k, scale, config, return_mass=True)
        return Selection(*ku.compact_mask(keep), mass if with_mass else None)
    if vs_blocks is None:
        vs_blocks = vs_flags(q, k, scale, config)
    return search_rows(q, k, scale, config, kmean, None, with_mass, vs_blocks)


def search_rows(q: torch.Tensor, k: torch.Tensor, scale: float, config: FlashPrefillConfig,
                kmean: torch.Tensor | None, rows: tuple[int, int, int] | None,
                with_mass: bool = False, vs_blocks=None) -> Selection:
    """The Triton search under ``config``: of the query blocks ``rows`` (start, step, n; None:
    all of them); ``vs_blocks``: the call's vertical/slash flags (``vs_flags``; None when the
    detector is off). The one place that turns a config into ``pattern_search``'s arguments."""
    from .kernels.pattern_search import pattern_search

    num, idx, *mass = pattern_search(
        q, k, scale, config.block_size, config.alpha, config.sink_blocks, config.window_blocks,
        config.last_dense_blocks, gqa_shared=config.gqa_shared, kmean=kmean,
        mass_floor=config.mass_floor, return_mass=with_mass, rows=rows, vs_blocks=vs_blocks,
        row_stride=config.search_stride)
    return Selection(num, idx, mass[0] if mass else None)


def vs_flags(q: torch.Tensor, k: torch.Tensor, scale: float, config: FlashPrefillConfig
             ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The line detectors' (column_blocks, diagonal_blocks), each (B, H, M) uint8 (what the
    search reads, so it copies nothing), for the Triton search's ``vs_blocks``: the
    vertical/slash detector's (``vertical_slash``) OR the slash probe's (``slash_probe`` > 0;
    diagonals only); None when both are off. Computed once per call: they read the whole
    prompt (the last query block; rows across the second half), whichever rows a search
    selects."""
    flags = None
    if config.vertical_slash:
        from .kernels.vertical_slash import vertical_slash_flags

        flags = vertical_slash_flags(q, k, scale, config.block_size, config.vs_threshold,
                                     n_rows=config.vs_rows or None, flag_dtype=torch.uint8)
    if config.slash_probe > 0:
        from .kernels.slash_probe import slash_probe_flags

        column, diagonal = slash_probe_flags(q, k, scale, config.block_size,
                                             config.slash_probe)
        column, diagonal = column.to(torch.uint8), diagonal.to(torch.uint8)
        flags = (column, diagonal) if flags is None else (flags[0], flags[1] | diagonal)
    return flags
