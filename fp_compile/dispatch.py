"""The dispatch layer: how one FlashPrefill call runs, given its tensors and its config.

Everything between the op registrations (``ops.py``) and the kernels (``kernels/``) lives
here, so a call's route is ops -> dispatch -> kernels and the config travels as one object:

* ``run(q, k, v, scale, config, layer)``: the whole op (dense below ``min_seq_len``, else the
  selection and block-sparse attention), on concrete or traced tensors;
* ``select(q, k, scale, config)``: the selection alone, compact, with the mass guard
  (``select_blocks`` and stats use it; defined in ``selection.py`` with ``Selection``,
  ``use_triton`` and ``vs_flags``, re-exported here);
* ``probe(...)``: the dense decision, per kv group, from the selection of about
  ``PROBE_ROWS`` evenly spaced query blocks (read on the host, not during CUDA-graph capture),
  taken before the full search; ``dense_history`` guesses the decision from earlier calls;
* ``sparse_chunks(...)``: select and attend a chunk of query blocks at a time, so the index
  memory stays within ``INDEX_BYTES`` whatever the length;
* ``dense(q, k, v, scale)``: the dense causal path (cuDNN on Hopper);
* ``config.fp8_attention``: the block-sparse attention in FP8 (``fp8.attend``, from ``sparse``);
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
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from . import dense_history as history
from .dense_history import dense_groups, host_flags  # noqa: F401 (dense_groups re-exported)
from . import fp8
from .config import FlashPrefillConfig
from .kernels import utils as ku
from .kernels.block_sparse_attention import block_sparse_attention_reference
from .selection import (Selection, search_rows, select, select_mask,  # noqa: F401
                        use_triton, vs_flags)

_observers: list[Callable] = []

@contextlib.contextmanager
def observe(fn: Callable) -> Iterator[None]:
    """Call ``fn(layer, q, k, scale, config)`` at the start of every ``run`` in this context."""
    _observers.append(fn)
    try:
        yield
    finally:
        _observers.remove(fn)


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
            and ku.hopper(q.device)):
        return torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, False, 0.0, True, False, scale=scale)[0]
    return _sdpa_causal(q, k, v, scale)


def _sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain causal SDPA, GQA k/v as they are (SDPA's own backend choice)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           config: FlashPrefillConfig, num: torch.Tensor, idx: torch.Tensor,
           kmean: torch.Tensor | None = None, vmean: torch.Tensor | None = None, *,
           out: torch.Tensor | None = None, q_start: int = 0, kv8=None) -> torch.Tensor:
    """Block-sparse attention over the selection (num, idx); ``q_start``: q holds the queries
    from that position on (num / idx their rows), as for ``block_sparse_attention``. With
    ``config.fp8_attention`` in FP8 (``fp8.attend``; kv8: k and v quantised already)."""
    if config.fp8_attention:
        return fp8.attend(q, k, v, scale, config, num, idx, triton=use_triton(q, config.kernel),
                          out=out, q_start=q_start, kv=kv8)
    if not use_triton(q, config.kernel):
        return block_sparse_attention_reference(q, k, v, num, idx, scale, config.block_size,
                                                config.mean_correction, q_start=q_start)
    from .kernels.block_sparse_attention import block_sparse_attention, capture_tile

    capturing = _capturing(q)
    if (not capturing and not config.mean_correction and q.element_size() == 2
            and q.shape[-1] <= 128 and config.block_size == 128):
        # The TMA variant where it was measured (16-bit, D <= 128, blocks of 128; RESULTS.md
        # run 45: 1.09-1.11x the pointer kernel at 8K-128K); while torch.compile traces, and
        # for k / v with no (B * Hkv * S, D) row view, it reads them through pointers instead
        # ("ptr_fold": host descriptors launch eagerly only).
        from .kernels.block_sparse_attention_tma import block_sparse_attention_variant

        return block_sparse_attention_variant(q, k, v, num, idx, scale, config.block_size,
                                              variant=ATTENTION_VARIANT, out=out,
                                              q_start=q_start)
    # No autotuning while a CUDA graph is captured (it would run and time candidates there)
    tile = capture_tile(q, config.block_size) if capturing else None
    return block_sparse_attention(q, k, v, num, idx, scale, config.block_size,
                                  mean_correction=config.mean_correction, kmean=kmean,
                                  vmean=vmean, tile=tile, out=out, q_start=q_start)


# The attention variant (kernels/block_sparse_attention_tma.VARIANTS) of eager 16-bit launches
# with blocks of 128; "default": the pointer kernel (block_sparse_attention) everywhere.
ATTENTION_VARIANT = "tma_fold"


def _capturing(q: torch.Tensor) -> bool:
    return q.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


# The dense decision reads the selection of about this many query blocks, evenly spaced and
# ending at the last (the probe): a search over them costs about PROBE_ROWS / M of the full one.
PROBE_ROWS = 64

# The selection's kv_indices is built and consumed this many bytes of rows at a time: a long
# prompt is selected and attended a chunk of query blocks at a time, so the index memory
# follows the chunk, not the (B, H, M, M) square (8.6 GB at 1M tokens, 32 heads, block 128).
INDEX_BYTES = 256 * 2**20


def probe_rows(M: int) -> tuple[int, int, int]:
    """(start, step, n): the query blocks the dense decision reads, start + c * step for
    c < n, the last one M - 1."""
    step = max(1, M // PROBE_ROWS)
    start = (M - 1) % step
    return start, step, (M - 1 - start) // step + 1


def chunk_rows(B: int, H: int, M: int) -> int:
    """Query blocks per chunk of the selection: kv_indices of a chunk fits ``INDEX_BYTES``."""
    return max(1, min(M, INDEX_BYTES // (B * H * M * 4)))


def in_chunks(q: torch.Tensor, block_size: int) -> bool:
    """Whether a call on q selects in more than one chunk."""
    M = ku.cdiv(q.shape[2], block_size)
    return chunk_rows(q.shape[0], q.shape[1], M) < M


def _chunk(q: torch.Tensor, config: FlashPrefillConfig) -> tuple[int, int]:
    """(M, query blocks per chunk of this call). The vertical/slash detector does not need
    whole rows: its flags, computed once per call (``vs_flags``), go into every chunk's
    search, which reads them at its absolute query blocks."""
    M = cdiv_blocks(q, config)
    return M, chunk_rows(q.shape[0], q.shape[1], M)


def dense_groups_of(num: torch.Tensor, num_kv_heads: int, dense_above: float) -> torch.Tensor:
    """``dense_groups`` from a whole selection's kv_num_blocks (B, H, M): read at the probe
    rows, as ``probe`` reads them."""
    rows = probe_rows(num.shape[-1])
    return dense_groups(num[..., rows[0]::rows[1]], num_kv_heads, dense_above, rows)


def probe(q: torch.Tensor, k: torch.Tensor, scale: float, config: FlashPrefillConfig,
          kmean: torch.Tensor | None = None, ahead: Optional[Callable] = None, vs_blocks=None):
    """The dense decision, on the host: ((B, Hkv) bool flags, ahead() or None).

    The flags come from the probe rows' selection (``probe_rows``), read through ``host_flags``
    with ``ahead`` (the first chunk's selection) queued before the host waits: a sparse call
    loses only the probe (about PROBE_ROWS / M of the search), a dense call the probe and
    ``ahead``'s work. ``vs_blocks``: the call's vertical/slash flags (counted in the density).
    """
    rows = probe_rows(cdiv_blocks(q, config))
    num = search_rows(q, k, scale, config, kmean, rows, vs_blocks=vs_blocks).num
    return host_flags(num, lambda n: dense_groups(n, k.shape[1], config.dense_above, rows),
                      ahead)


def cdiv_blocks(q: torch.Tensor, config: FlashPrefillConfig) -> int:
    """M: the number of query (and key) blocks."""
    return ku.cdiv(q.shape[2], config.block_size)


def first_selection(q: torch.Tensor, k: torch.Tensor, scale: float,
                    config: FlashPrefillConfig, kmean=None, with_mass: bool = False,
                    vs_blocks=None) -> Selection:
    """The selection ``sparse_chunks`` starts with: the whole one when it fits one chunk, else
    the first chunk's (query blocks 0 .. chunk_rows - 1)."""
    M, step = _chunk(q, config)
    if step >= M:
        return select(q, k, scale, config, kmean=kmean, with_mass=with_mass,
                      vs_blocks=vs_blocks)
    return search_rows(q, k, scale, config, kmean, (0, 1, step), with_mass, vs_blocks)


def sparse_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  config: FlashPrefillConfig, kmean=None, vmean=None,
                  skip_heads: torch.Tensor | None = None, attend: bool = True,
                  with_mass: bool = False, sel: Optional[Selection] = None,
                  first: Optional[Selection] = None, vs_blocks=None
                  ) -> tuple[Optional[torch.Tensor], Selection]:
    """Select and attend a chunk of query blocks at a time (``chunk_rows``) with the Triton
    kernels. Returns (out or None when not ``attend``, Selection(num (B, H, M), idx of the last
    chunk, mass or None)). skip_heads: (B, H) bool on the device, heads whose rows are emptied
    (the kernel skips them; the caller runs them dense). sel: the whole selection, when the
    caller has it already (it is then used as it is, in one chunk). first: what
    ``first_selection`` returned (the whole selection, or the first chunk's). vs_blocks: the
    call's vertical/slash flags (``vs_flags``), computed here when None and the detector is on.
    """
    S = q.shape[2]
    M, step = _chunk(q, config)
    if step >= M or sel is not None:
        sel = sel if sel is not None else first
        if sel is None:
            sel = select(q, k, scale, config, kmean=kmean, with_mass=with_mass,
                         vs_blocks=vs_blocks)
        num = sel.num if skip_heads is None else sel.num.masked_fill(skip_heads[..., None], 0)
        out = sparse(q, k, v, scale, config, num, sel.idx, kmean, vmean) if attend else None
        return out, sel
    if kmean is None:
        from .kernels.block_means import block_means

        kmean = block_means(k, config.block_size, out_dtype=q.dtype)
    if vs_blocks is None:
        vs_blocks = vs_flags(q, k, scale, config)
    out = torch.empty_like(q) if attend else None
    # FP8: k and v quantised once for every chunk.
    kv8 = fp8.quantize_kv(k, v, config, True) if config.fp8_attention and attend else None
    chunks = []
    bs = config.block_size
    for i0 in range(0, M, step):
        n = min(step, M - i0)
        if i0 == 0 and first is not None:
            chunk = first
        else:
            chunk = search_rows(q, k, scale, config, kmean, (i0, 1, n), with_mass, vs_blocks)
        chunks.append(chunk)
        num = chunk.num
        if skip_heads is not None:
            num = num.masked_fill(skip_heads[..., None], 0)
        if attend:
            r0, r1 = i0 * bs, min(S, (i0 + n) * bs)
            sparse(q[:, :, r0:r1], k, v, scale, config, num, chunk.idx, kmean, vmean,
                   out=out[:, :, r0:r1], q_start=r0, kv8=kv8)
    mass = torch.cat([c.mass for c in chunks], dim=-1) if with_mass else None
    return out, Selection(torch.cat([c.num for c in chunks], dim=-1), chunks[-1].idx, mass)


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

    The dense decision (``dense_above`` < 1) is taken first, from the probe rows' selection
    (``probe``), so a call that runs dense pays a search over PROBE_ROWS rows, not the full
    search. The host reads the flags, so it is skipped while a CUDA graph is being captured (a
    capture cannot read device values): every group then runs block-sparse, exact but slower
    than dense where the density is high. ``layer`` is the SDPA call's layer number (-1:
    unknown), for stats and observers.
    """
    scale = ku.default_scale(q.shape[-1], scale)
    fp8.check_inputs(q, config)
    for fn in list(_observers):
        fn(layer, q, k, scale, config)
    if q.shape[2] < config.min_seq_len:
        if config.collect_stats:
            _record(layer, q, k, config, None, None)
        return dense(q, k, v, scale)
    if not use_triton(q, config.kernel):
        return _run_reference_kernels(q, k, v, scale, config, layer)
    from .kernels.block_means import block_means

    vmean = None
    if config.mean_correction:
        # One pass over K and V gives the block statistics of both stages.
        kmean, vmean = block_means(k, config.block_size, v)
    else:
        # Shared by the probe and every chunk's search.
        kmean = block_means(k, config.block_size, out_dtype=q.dtype)
    # The vertical/slash flags, once per call: the probe and every chunk read them (None: not
    # computed yet; the selection computes them when it needs them).
    vs = flags = skip = sel = first = ahead_dense = key = None
    if config.dense_above < 1 and not _capturing(q):
        M, step = _chunk(q, config)
        if probe_rows(M)[1] == 1 and step >= M:
            # The whole selection first, in one chunk, when the probe would read every row
            # anyway.
            vs = vs_flags(q, k, scale, config)
            sel = select(q, k, scale, config, kmean=kmean, with_mass=config.collect_stats,
                         vs_blocks=vs)
            flags = dense_groups_of(sel.num.cpu(), k.shape[1], config.dense_above)
        else:
            key = history.key(q, k, layer)
            if step >= M and history.expect_sparse(key, q, config):
                return _speculative_sparse(q, k, v, scale, config, kmean, vmean,
                                           vs_flags(q, k, scale, config), key)
            if history.expect_dense(key, q, config):
                flags, ahead_dense, vs = _probe_expecting_dense(q, k, v, scale, config, kmean)
            else:
                vs = vs_flags(q, k, scale, config)
                flags, first = probe(q, k, scale, config, kmean, ahead=lambda: first_selection(
                    q, k, scale, config, kmean, config.collect_stats, vs), vs_blocks=vs)
    # Read once: the flags are a host tensor, and every read is a torch op on the host.
    all_dense = flags is not None and bool(flags.all())
    any_dense = flags is not None and bool(flags.any())
    if key is not None:
        history.remember(key, all_dense, any_dense)
    if all_dense and not config.collect_stats:
        # cuDNN already queued behind the probe, or launched now
        return ahead_dense if ahead_dense is not None else dense(q, k, v, scale)
    if any_dense:
        skip = flags.to(q.device).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    out, sel = sparse_chunks(q, k, v, scale, config, kmean, vmean, skip, attend=not all_dense,
                             with_mass=config.collect_stats, sel=sel, first=first,
                             vs_blocks=vs)
    if any_dense:
        out = _dense_runs(q, k, v, scale, flags, out, ahead_dense)
    if config.collect_stats:
        _record(layer, q, k, config, sel, flags)
    return out


def _probe_expecting_dense(q, k, v, scale, config: FlashPrefillConfig, kmean):
    """``probe`` for a call expected to run dense (``dense_history.expect_dense``), with cuDNN
    queued behind it, and without the line detectors' probe unless the call turns out not to
    be all dense. Their blocks are OR-ed into a selection after the mass guard, so they only
    add kept blocks: a kv group above ``dense_above`` without them is above it with them, and a
    call all dense without them is all dense with them (the same flags). Otherwise the probe
    runs again with the detectors' flags, for the exact flags of the other groups.
    Returns (flags, cuDNN's output, the detectors' flags or None when not computed)."""
    flags, ahead_dense = probe(q, k, scale, config, kmean, ahead=lambda: dense(q, k, v, scale))
    vs = None
    if not bool(flags.all()):
        vs = vs_flags(q, k, scale, config)
        if vs is not None:
            flags = probe(q, k, scale, config, kmean, vs_blocks=vs)[0]
    return flags, ahead_dense, vs


def _speculative_sparse(q, k, v, scale, config: FlashPrefillConfig, kmean, vmean, vs, key):
    """``run`` for a call expected to run block-sparse (``dense_history.expect_sparse``): the
    whole selection, its probe rows' dense flags, the attention queued before the host reads
    them; then the flagged groups run dense, as without the guess."""
    sel = select(q, k, scale, config, kmean=kmean, vs_blocks=vs)      # one chunk: all of it
    flags, out = host_flags(sel.num, lambda n: dense_groups_of(n, k.shape[1],
                                                               config.dense_above),
                            ahead=lambda: sparse(q, k, v, scale, config, sel.num, sel.idx,
                                                 kmean, vmean))
    any_dense = bool(flags.any())
    history.remember(key, bool(flags.all()), any_dense)
    return _dense_runs(q, k, v, scale, flags, out) if any_dense else out


def _dense_runs(q, k, v, scale, flags: torch.Tensor, out: Optional[torch.Tensor],
                dense_out: Optional[torch.Tensor] = None):
    """out with the flagged kv groups' heads replaced by dense attention (flags on the host);
    dense_out: the whole call's dense output when it was computed already (a wrong guess of
    ``dense_history.expect_dense``), read instead of new dense calls."""
    if bool(flags.all()):
        return dense_out if dense_out is not None else dense(q, k, v, scale)
    G = q.shape[1] // k.shape[1]
    for b, g0, g1 in _runs(flags):
        h0, h1 = g0 * G, g1 * G
        out[b:b + 1, h0:h1] = (dense_out[b:b + 1, h0:h1] if dense_out is not None else dense(
            q[b:b + 1, h0:h1], k[b:b + 1, g0:g1], v[b:b + 1, g0:g1], scale))
    return out


def _run_reference_kernels(q, k, v, scale, config: FlashPrefillConfig, layer: int):
    """``run`` on the plain-torch references (non-CUDA devices, fp64, kernel="reference")."""
    sel = select(q, k, scale, config, with_mass=config.collect_stats)
    flags = None
    if config.dense_above < 1:
        flags = dense_groups_of(sel.num, k.shape[1], config.dense_above)
    skip = None if flags is None else flags.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    if skip is not None and bool(skip.all()):
        out = None
    else:
        num = sel.num if skip is None else sel.num.masked_fill(skip[..., None], 0)
        out = sparse(q, k, v, scale, config, num, sel.idx)
    if flags is not None:
        out = _dense_runs(q, k, v, scale, flags.cpu(), out)
    if config.collect_stats:
        _record(layer, q, k, config, sel, None if flags is None else flags.cpu())
    return out


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
              config: FlashPrefillConfig) -> torch.Tensor:
    """The whole op in plain torch, whatever ``config.kernel`` says: what ``run`` must equal
    (outside CUDA-graph capture): dense below ``min_seq_len``; else the selection, block-sparse
    attention, and exact attention for the kv groups above ``dense_above`` (decided on the
    probe rows, ``probe_rows``)."""
    scale = ku.default_scale(q.shape[-1], scale)
    fp8.check_inputs(q, config)
    if q.shape[2] < config.min_seq_len:
        return _sdpa_causal(q, k, v, scale)
    num, idx = ku.compact_mask(select_mask(q, k, scale, config))
    flags = dense_groups_of(num, k.shape[1], config.dense_above)
    if config.fp8_attention:
        out = fp8.attend(q, k, v, scale, config, num, idx, triton=False)
    else:
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

    record(layer, q.shape[2], q.shape[0], config.block_size, config.alpha,
           None if sel is None else sel.num, q.shape[1],
           mass=None if sel is None else sel.mass, dense_groups=flags,
           options=config.options_summary())
