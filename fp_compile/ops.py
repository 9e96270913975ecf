"""Registration of ``torch.ops.fp_compile.flash_prefill`` (and its opaque twin). Nothing else.

The schema is flat and explicit (saved ``.pt2`` programs name every argument): q, k, v, scale,
then the fields of ``OP_CONFIG_FIELDS`` in order, then the layer. Each op body rebuilds the
``FlashPrefillConfig`` once from those scalars and hands it to ``dispatch.run``; nothing below
the op boundary sees loose config scalars.

``flash_prefill`` is a ``torch.library.triton_op``: under torch.compile on CUDA with a static
sequence length AOT autograd decomposes it into its body, so Inductor sees the Triton kernels
(launched through ``wrap_triton``) and writes them into its generated code; torch.export keeps
the op whole. Everywhere else the body calls ``fp_compile::flash_prefill_eager``, an opaque
custom op with a fake kernel: it is traced once with fake tensors and decides dense vs sparse
at run time, with concrete shapes, so no guard on the sequence length enters the graph (CPU,
the reference kernel, stats, and graphs with a symbolic length).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch.library import infer_schema, triton_op

from . import dispatch, spans
from .config import FlashPrefillConfig
from .passes.eligibility import check_inputs

# Config fields passed to the op, in schema order (after q, k, v, scale).
OP_CONFIG_FIELDS = (
    "block_size", "alpha", "sink_blocks", "window_blocks", "last_dense_blocks", "min_seq_len",
    "kernel", "mean_correction", "gqa_shared", "collect_stats", "vertical_slash", "vs_threshold",
    "mass_floor", "dense_above", "fp8_attention", "slash_probe", "vs_rows", "search_stride",
)


def op_config_args(config: FlashPrefillConfig) -> tuple:
    """The config as the op's flat arguments (``OP_CONFIG_FIELDS`` order)."""
    return tuple(getattr(config, name) for name in OP_CONFIG_FIELDS)


def _fields(arguments: dict) -> tuple:
    """The config fields among an op body's arguments (its ``locals()`` on entry), in
    ``OP_CONFIG_FIELDS`` order: the one place besides the schemas that lists them."""
    return tuple(arguments[name] for name in OP_CONFIG_FIELDS)


# The opaque ops are defined on a Library with plain CPU / CUDA kernels and a thin autograd
# kernel rather than through ``torch.library.custom_op``, whose Python autograd and aliasing
# layers cost about 30 us per call on the host (the dynamic-shape path pays them on every
# prefill: RESULTS.md run 77). The schema is the one custom_op inferred (``infer_schema``), so
# saved programs read the same ops.
_LIB = torch.library.Library("fp_compile", "FRAGMENT")


class _NoBackward(torch.autograd.Function):
    """The op's forward where a gradient is asked for; its backward refuses (prefill has no
    backward), as custom_op's did, rather than leaving a gradient silently missing."""

    @staticmethod
    def forward(ctx, overload, kwargs, *args):
        ctx.name = overload.name()
        with torch._C._AutoDispatchBelowAutograd():
            return overload(*args, **kwargs)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"{ctx.name} has no backward: FlashPrefill is for inference "
                           "(run the prefill under torch.no_grad() or torch.inference_mode())")


def _opaque_op(fn):
    """Define ``fp_compile::<fn name>`` from ``fn``'s signature, with ``fn`` as its CPU and CUDA
    kernel and an autograd kernel that passes straight to them unless q, k or v asks for a
    gradient (then ``_NoBackward``): plain CPU / CUDA tensors with no dispatch mode active
    call ``fn`` directly; fake or traced ones go on down the dispatcher (to the fake kernel).
    Returns the OpOverloadPacket."""
    name = fn.__name__
    _LIB.define(name + infer_schema(fn, mutates_args=()), tags=(torch.Tag.pt2_compliant_tag,))
    for key in ("CPU", "CUDA"):
        _LIB.impl(name, fn, key)
    overload = getattr(torch.ops.fp_compile, name).default

    def autograd(*args, **kwargs):
        q = args[0]
        if torch.is_grad_enabled() and (q.requires_grad or args[1].requires_grad
                                        or args[2].requires_grad):
            return _NoBackward.apply(overload, kwargs, *args)
        if (type(q) is torch.Tensor and q.device.type in ("cpu", "cuda")
                and not torch._C._len_torch_dispatch_stack()):
            return fn(*args, **kwargs)      # the kernel itself: no second trip to dispatch
        with torch._C._AutoDispatchBelowAutograd():     # fake / traced / other tensors
            return overload(*args, **kwargs)

    _LIB.impl(name, autograd, "Autograd")
    return getattr(torch.ops.fp_compile, name)


def _register_fake(op):
    return torch.library.register_fake(op.default, lib=_LIB)


@functools.lru_cache(maxsize=64)
def _config(*values) -> FlashPrefillConfig:
    """The op's flat arguments back into one config (validated once, here). Cached: the config
    is frozen, and building + validating it on every call of the opaque op cost host time
    that shows on the GPU wherever the host has just waited (benchmarks/profile_host.py)."""
    return FlashPrefillConfig(**dict(zip(OP_CONFIG_FIELDS, values)))


def flash_prefill_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        scale: Optional[float], block_size: int, alpha: float, sink_blocks: int,
                        window_blocks: int, last_dense_blocks: int, min_seq_len: int,
                        kernel: str, mean_correction: bool, gqa_shared: bool,
                        collect_stats: bool, vertical_slash: bool = False,
                        vs_threshold: float = 0.015, mass_floor: float = 0.0,
                        dense_above: float = 1.0, fp8_attention: bool = False,
                        slash_probe: float = 0.0, vs_rows: int = 0, search_stride: int = 1,
                        layer: int = -1,
                        key_mask: Optional[torch.Tensor] = None,
                        q_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
    config = _config(*_fields(locals()))
    # The fake kernel promises a contiguous output; the reference (and SDPA for short prompts)
    # follow q's layout, which is a transposed view in most models.
    if has_span(q, k, key_mask, q_pos):
        return spans.run(q, k, v, scale, config, layer, key_mask, q_pos).contiguous()
    return dispatch.run(q, k, v, scale, config, layer).contiguous()


flash_prefill_eager_op = _opaque_op(flash_prefill_eager)


def has_span(q, k, key_mask, q_pos) -> bool:
    """Whether a call goes through ``spans`` (a key mask, query positions, or S_q < S_kv)."""
    return key_mask is not None or q_pos is not None or q.shape[2] != k.shape[2]


@_register_fake(flash_prefill_eager_op)
def _(q, k, v, *args, key_mask=None, q_pos=None, **kwargs):
    # The eager checks, so a bad call under torch.compile fails with the eager message.
    check_inputs(q, k, v, provable=False, span=has_span(q, k, key_mask, q_pos))
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def flash_prefill_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scale: Optional[float], block_size: int, alpha: float, sink_blocks: int,
                      window_blocks: int, last_dense_blocks: int, min_seq_len: int,
                      kernel: str, mean_correction: bool, gqa_shared: bool,
                      collect_stats: bool, vertical_slash: bool = False,
                      vs_threshold: float = 0.015, mass_floor: float = 0.0,
                      dense_above: float = 1.0, fp8_attention: bool = False,
                      slash_probe: float = 0.0, vs_rows: int = 0, search_stride: int = 1,
                      layer: int = -1,
                      key_mask: Optional[torch.Tensor] = None,
                      q_pos: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """flash_prefill that also returns the log-sum-exp per query row, (B, H, S_q) fp32 (natural
    log; -inf for a row that sees no key), so results over parts of the keys can be merged.
    Always runs the span dispatch (``spans``: its dense fallback is decided on the device)."""
    config = _config(*_fields(locals()))
    out, lse = spans.run(q, k, v, scale, config, layer, key_mask, q_pos, return_lse=True)
    return out.contiguous(), lse.contiguous()


flash_prefill_lse_op = _opaque_op(flash_prefill_lse)


@_register_fake(flash_prefill_lse_op)
def _(q, k, v, *args, **kwargs):
    check_inputs(q, k, v, provable=False, span=True)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(q.shape[:3], dtype=torch.float32))


@triton_op("fp_compile::flash_prefill", mutates_args=())
def flash_prefill_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     scale: Optional[float], block_size: int, alpha: float, sink_blocks: int,
                     window_blocks: int, last_dense_blocks: int, min_seq_len: int, kernel: str,
                     mean_correction: bool, gqa_shared: bool,
                     collect_stats: bool, vertical_slash: bool = False,
                     vs_threshold: float = 0.015, mass_floor: float = 0.0,
                     dense_above: float = 1.0, fp8_attention: bool = False,
                     slash_probe: float = 0.0, vs_rows: int = 0, search_stride: int = 1,
                     layer: int = -1,
                     key_mask: Optional[torch.Tensor] = None,
                     q_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
    """FlashPrefill causal attention. q (B, H, S, D); k, v (B, Hkv, S, D); returns (B, H, S, D).

    ``layer`` is the layer number the pass gave this SDPA call (-1: unknown), for stats.
    ``key_mask`` (B, S_kv) (nonzero: valid key) and ``q_pos`` (S_q,) (the queries' key
    positions; default the last S_q) make it a call with a span (``spans``): padded batches,
    a cached prefix (S_q < S_kv), a static cache buffer.
    The config fields' defaults in the schema are the paper's rule (guards off), so programs
    saved before a field existed run as they did.
    """
    fields = _fields(locals())
    span = has_span(q, k, key_mask, q_pos)
    check_inputs(q, k, v, provable=False, span=span)
    flat = (scale, *fields, layer)
    if span:
        # The span dispatch decides its dense fallback on the device, so nothing needs the
        # host: on CUDA with a static length it is traced and its kernels land in Inductor's
        # code; elsewhere it runs in the opaque op.
        if (q.device.type != "cuda" or kernel == "reference" or collect_stats
                or not isinstance(q.shape[2] < min_seq_len, bool)
                or not isinstance(k.shape[2] < min_seq_len, bool)):
            return torch.ops.fp_compile.flash_prefill_eager(q, k, v, *flat, key_mask=key_mask,
                                                            q_pos=q_pos)
        return spans.run(q, k, v, scale, _config(*fields), layer, key_mask, q_pos)
    if q.device.type != "cuda" or kernel == "reference" or collect_stats or dense_above < 1:
        # (dense_above < 1: the dense fallback decides on the host, which needs concrete
        # tensors: the whole call runs in the opaque op, its kernels launched from Python.)
        return torch.ops.fp_compile.flash_prefill_eager(q, k, v, *flat)
    if not isinstance(q.shape[2] < min_seq_len, bool):
        # Symbolic length (dynamic shapes): decide at run time, with the concrete length, inside
        # the opaque op, so no guard on S enters the graph and one compiled graph serves short
        # (dense) and long (sparse) prompts. (torch.cond would keep the kernels in Inductor's
        # code, but in torch 2.11 its Inductor lowering rejects the lifted size symbols, and
        # dynamo rejects k/v that are views of one tensor.) The kernels then launch from the
        # op's Python: no host synchronisation, so CUDA graphs still capture it.
        return torch.ops.fp_compile.flash_prefill_eager(q, k, v, *flat)
    if dispatch.in_chunks(q, block_size):
        # A prompt long enough to be selected in chunks (B * H * M * M * 4 bytes of index above
        # dispatch.INDEX_BYTES) runs opaque: traced, the chunks' launches into slices of one
        # output ran into an illegal memory access in Inductor's code on the H200 (run 19),
        # while the same launches from the opaque op are exact. At these lengths the kernels'
        # own time dwarfs what inlining saves.
        return torch.ops.fp_compile.flash_prefill_eager(q, k, v, *flat)
    # Static length: the same dispatch as the eager op, traced, so the kernels' wrap_triton
    # launches land in Inductor's code.
    return dispatch.run(q, k, v, scale, _config(*fields), layer)
