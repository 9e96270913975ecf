"""``apply_flashprefill``: the SDPA rewrite for torch.export graphs.

In an ExportedProgram SDPA is ``aten.scaled_dot_product_attention.default``. The rewrite is a
decomposition table with one entry: SDPA -> ``fp_compile.flash_prefill`` where the call is
eligible (the same rules as the FX pass, ``sdpa_skip_reason``), ``NotImplemented`` elsewhere,
which keeps SDPA as it was. Every other op is left as it is. The result survives
``torch.export.save``/``load`` (with ``fp_compile`` imported: it registers the op) and
AOTInductor.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx.traceback as fx_traceback

from .config import FlashPrefillConfig
from .ops import op_config_args
from .passes.eligibility import sdpa_skip_reason
from .passes.fx_utils import plain_shape
from .passes.layers import layer_numbers
from .passes.report import RewriteReport, Rewritten, Skipped

_last_report: Optional[RewriteReport] = None


def last_report() -> Optional[RewriteReport]:
    """The RewriteReport of the most recent ``apply_flashprefill`` call (None before any)."""
    return _last_report


def _replayed_node_name() -> Optional[str]:
    """Name of the original graph node being retraced, from FX's preserved node metadata."""
    sources = fx_traceback.get_current_meta().get("from_node") or ()
    return sources[0].name if sources else None


def apply_flashprefill(ep: torch.export.ExportedProgram,
                       config: FlashPrefillConfig | None = None) -> torch.export.ExportedProgram:
    """A new ExportedProgram with ``ep``'s eligible SDPA calls as ``fp_compile.flash_prefill``.

    Layers are numbered as in the FX pass (``layer_numbers``: the model's layer index from the
    module stack, else the order of SDPA calls in ``ep``'s graph). The
    RewriteReport is attached as ``result.flashprefill_report`` (and kept for ``last_report()``);
    the counters ``torch._dynamo.utils.counters["flashprefill"]`` are bumped as by the pass.
    Export graphs are inference graphs, so tensors that require grad do not stop the rewrite.
    """
    global _last_report
    from torch._dynamo.utils import counters

    config = config or FlashPrefillConfig()
    layers = {node.name: layer for node, layer in layer_numbers(ep.graph).items()}
    decisions: dict[int, tuple] = {}       # layer -> (reason or None, q shape, kv shape, name)

    def flash_prefill_or_not(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                             scale=None, enable_gqa=False):
        # Retracing may call this more than once per node (twice per trace, two traces), so
        # the layer comes from the node being replayed, not from a call count.
        name = _replayed_node_name()
        layer = layers.get(name, -1)
        reason = sdpa_skip_reason(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                  enable_gqa, check_grad=False)
        layer_config = None
        if reason is None and layer < 0:
            reason = "could not tell which SDPA call this is (node metadata not preserved)"
        if reason is None:
            layer_config = config.for_layer(layer)
            if layer_config is None:
                reason = "dense layer"
        if layer >= 0:
            decisions[layer] = (reason, plain_shape(query.shape), plain_shape(key.shape), name)
        if reason is not None:
            return NotImplemented
        return torch.ops.fp_compile.flash_prefill.default(
            query, key, value, scale, *op_config_args(layer_config), layer)

    table = {torch.ops.aten.scaled_dot_product_attention.default: flash_prefill_or_not}
    new_ep = ep.run_decompositions(table)
    report = RewriteReport()
    for name, layer in layers.items():
        reason, q_shape, kv_shape, _ = decisions.get(
            layer, ("not seen by the decomposition", (), (), name))
        if reason is None:
            report.rewritten.append(Rewritten(name, layer, q_shape, kv_shape, ""))
        else:
            report.skipped.append(Skipped(name, layer, reason))
    counters["flashprefill"]["sdpa_rewritten"] += len(report.rewritten)
    counters["flashprefill"]["sdpa_skipped"] += len(report.skipped)
    _last_report = report
    try:
        new_ep.flashprefill_report = report
    except AttributeError:  # an ExportedProgram that refuses new attributes: last_report() only
        pass
    return new_ep
