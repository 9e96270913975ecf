"""The FX pass: causal, unmasked, prefill-shaped SDPA calls -> ``torch.ops.fp_compile.flash_prefill``.

Works on dynamo graphs (torch IR, before AOT autograd), where an SDPA call is one
``call_function`` node with the arguments as the user wrote them and fake tensors in
``meta["example_value"]`` (``meta["val"]`` in export graphs). Every SDPA node gets a layer number
(``layers.layer_numbers``: the model's layer index where the module stack tells it, else the
order in the graph); each one is either rewritten or left dense with a reason, both recorded in
the returned ``RewriteReport``, counted in ``torch._dynamo.utils.counters["flashprefill"]`` and
logged on the ``fp_compile`` logger (each graph's summary at INFO, each skip at DEBUG).

The pieces: ``eligibility`` (which calls the op can take), ``gqa_fold`` (k/v head repeats folded
into GQA), ``causal_mask`` (an ``attn_mask`` proven to be the causal mask), ``layers``.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.fx

from ..config import SPAN_UNSUPPORTED, FlashPrefillConfig
from ..ops import op_config_args
from .causal_mask import causal_mask_reason, mask_chain
from .eligibility import sdpa_skip_reason
from .fx_utils import known_eq, meta_value, meta_values, normalize_sdpa_args, plain_shape
from .gqa_fold import unrepeated
from .layers import layer_numbers
from .report import Rewritten, RewriteReport, Skipped
from .span_mask import span_mask_reason

# The README's promise: decisions are logged under "fp_compile" (INFO per graph, DEBUG per skip).
log = logging.getLogger("fp_compile")

@dataclass(frozen=True)
class Skip:
    """The decision to leave an SDPA node dense, and why."""

    reason: str


@dataclass(frozen=True)
class RewritePlan:
    """The decision to rewrite an SDPA node: what the op gets and what becomes dead.

    ``query`` (B, H, S, D), ``key``/``value`` (B, Hkv, S, D) are the nodes the op reads (k/v
    un-repeated when a head repeat was folded); ``chains`` are the folded nodes, each chain
    outermost first; ``folded`` names them for the report.
    """

    layer_config: FlashPrefillConfig
    query: torch.fx.Node
    key: torch.fx.Node
    value: torch.fx.Node
    scale: Optional[float]
    chains: tuple
    folded: str
    q_shape: tuple
    kv_shape: tuple
    key_mask: Optional[torch.fx.Node] = None   # the padding mask the op takes (a span call)
    q_pos: Optional[torch.fx.Node] = None      # the queries' positions (a cache buffer)
    form: str = "plain"


Decision = Union[Skip, RewritePlan]


def _plan(node: torch.fx.Node, layer: int, config: FlashPrefillConfig,
          mask_reasons: Optional[dict] = None) -> Decision:
    """Decide one SDPA node of layer ``layer``.

    ``mask_reasons`` caches ``causal_mask_reason`` per mask (models share one across layers).
    """
    args = normalize_sdpa_args(node)
    values = meta_values(args)
    if isinstance(args["attn_mask"], torch.fx.Node) and values["attn_mask"] is None:
        values["attn_mask"] = args["attn_mask"]      # a mask node without metadata is a mask
    k_node, v_node, chains, folded = args["key"], args["value"], (), ""
    fk, fv = unrepeated(k_node), unrepeated(v_node)
    if fk and fv:
        kb, vb = meta_value(fk.base), meta_value(fv.base)
        if known_eq(kb.shape[1], vb.shape[1]):
            k_node, v_node, chains, folded = fk.base, fv.base, (fk.chain, fv.chain), fk.pattern
            values = dict(values, key=kb, value=vb)
    q, k, v = values["query"], values["key"], values["value"]
    reason = sdpa_skip_reason(q, k, v, values["attn_mask"], values["dropout_p"],
                              values["is_causal"], values["scale"], values["enable_gqa"],
                              gqa_folded=bool(chains))
    mask = args["attn_mask"]
    key_mask = q_pos = None
    form = "plain"
    if (reason == "attn_mask given" and values["is_causal"] is False
            and isinstance(mask, torch.fx.Node)):
        mask_reasons = {} if mask_reasons is None else mask_reasons
        key = (mask, plain_shape(q.shape), plain_shape(k.shape))

        def eligible(span: bool) -> Optional[str]:
            # the call as if is_causal=True without the mask
            return sdpa_skip_reason(q, k, v, None, values["dropout_p"], True, values["scale"],
                                    values["enable_gqa"], gqa_folded=bool(chains), span=span)

        base = eligible(False)
        if base is None:                        # S_q == S_kv: the plain causal mask?
            if ("causal",) + key not in mask_reasons:
                mask_reasons[("causal",) + key] = causal_mask_reason(mask, q, k)
            reason = mask_reasons[("causal",) + key]
        as_span = eligible(True) if reason is not None else None
        if as_span == "decode (q_len 1)":
            reason = as_span                    # a decode step's mask: not prefill at all
        elif reason is not None and as_span is None:
            # a padded batch or queries at the end of a cache: a call with a span
            if ("span",) + key not in mask_reasons:
                mask_reasons[("span",) + key] = span_mask_reason(mask, q, k)
            span_reason, proven = mask_reasons[("span",) + key]
            if proven is not None:
                reason, key_mask, q_pos, form = None, *proven
            elif base is not None or reason == "attn_mask given":
                reason = span_reason
        if reason is None:
            chains += (mask_chain(mask),)
            folded = ", ".join(filter(None, (folded, "causal attn_mask")))
    if reason is None and chains:
        # the gradient check must see the tensors SDPA saw, not only the folded bases
        original = meta_values(args)
        if original["key"].requires_grad or original["value"].requires_grad:
            reason = "requires grad"
    if reason is not None:
        return Skip(reason)
    layer_config = config.for_layer(layer)
    if layer_config is None:
        return Skip("dense layer")
    if key_mask is not None or form not in ("plain", "causal"):
        for name in SPAN_UNSUPPORTED:
            if getattr(layer_config, name):
                return Skip(f"{form} call: {name} is not supported with a span")
    return RewritePlan(layer_config, args["query"], k_node, v_node, args["scale"], chains,
                       folded, plain_shape(q.shape), plain_shape(k.shape), key_mask, q_pos,
                       "plain" if form == "causal" else form)


def _replace(graph: torch.fx.Graph, node: torch.fx.Node, layer: int,
             plan: RewritePlan) -> Rewritten:
    """Put the op in ``node``'s place, then erase the folded chains that became unused."""
    op = torch.ops.fp_compile.flash_prefill.default
    with graph.inserting_before(node):
        span = ({} if plan.key_mask is None and plan.q_pos is None
                else {"key_mask": plan.key_mask, "q_pos": plan.q_pos})
        new = graph.call_function(op, (plan.query, plan.key, plan.value, plan.scale,
                                       *op_config_args(plan.layer_config), layer), span)
    try:
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
    except BaseException:
        graph.erase_node(new)
        raise
    graph.erase_node(node)
    erased = set()
    for chain in plan.chains:
        for dead in chain:                  # outermost first: each becomes unused in turn
            if dead not in erased and not dead.users:
                graph.erase_node(dead)
                erased.add(dead)
    return Rewritten(node.name, layer, plan.q_shape, plan.kv_shape, plan.folded, plan.form)


def rewrite_sdpa(gm: torch.fx.GraphModule,
                 config: FlashPrefillConfig | None = None) -> RewriteReport:
    """Rewrite ``gm``'s eligible SDPA calls into ``fp_compile.flash_prefill``, in place.

    Eligible: is_causal=True and no attn_mask (or is_causal=False and an attn_mask computed from
    sizes only that provably is the causal mask, which is then removed), dropout_p == 0, 4-D
    floating inputs, S_q == S_kv provable without a guard, equal head dims, equal head counts or
    GQA (enable_gqa=True, or a head repeat of k/v folded away), nothing requiring grad (the op
    has no backward), and the layer not in ``config.dense_layers``. A failure while handling one
    node leaves that node dense, with a warning and the reason in the report; it never fails the
    compile.
    """
    from torch._dynamo.utils import counters

    config = config or FlashPrefillConfig()
    report = RewriteReport()
    graph = gm.graph
    mask_reasons: dict = {}
    for node, layer in layer_numbers(graph).items():
        name = node.name
        try:
            decision = _plan(node, layer, config, mask_reasons)
            if isinstance(decision, Skip):
                report.skipped.append(Skipped(name, layer, decision.reason))
            else:
                report.rewritten.append(_replace(graph, node, layer, decision))
        except Exception as e:  # noqa: BLE001  (one bad node must not break the user's compile)
            why = f"pass error: {type(e).__name__}: {e}"
            warnings.warn(f"fp_compile: left SDPA node {name} (layer {layer}) dense; {why}",
                          stacklevel=2)
            report.skipped.append(Skipped(name, layer, why))
    if report.rewritten:
        graph.lint()
        gm.recompile()
    counters["flashprefill"]["sdpa_rewritten"] += len(report.rewritten)
    counters["flashprefill"]["sdpa_skipped"] += len(report.skipped)
    for s in report.skipped:
        log.debug("flashprefill: layer %d, node %s left dense: %s", s.layer, s.node, s.reason)
    log.info("%s", report.summary())
    return report
