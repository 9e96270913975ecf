"""The FX pass: causal, unmasked, prefill-shaped SDPA calls -> ``torch.ops.fp_compile.flash_prefill``.

Works on dynamo graphs (torch IR, before AOT autograd), where an SDPA call is one
``call_function`` node with the arguments as the user wrote them and fake tensors in
``meta["example_value"]`` (``meta["val"]`` in export graphs). Every SDPA node is numbered by its
order in the graph (the "layer"); each one is either rewritten or left dense with a reason, both
recorded in the returned ``RewriteReport`` and counted in
``torch._dynamo.utils.counters["flashprefill"]``.

The eligibility rules (``sdpa_skip_reason``) read only tensor metadata, so the export path
(``fp_compile.export``) applies the same rules to the fake tensors it is handed.
"""

from __future__ import annotations

import inspect
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true, sym_eq

from ..config import FlashPrefillConfig
from ..ops import op_config_args

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

SDPA_TARGETS = (
    torch._C._nn.scaled_dot_product_attention,
    torch.nn.functional.scaled_dot_product_attention,
    torch.ops.aten.scaled_dot_product_attention.default,
)


def _sdpa_signature(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                    scale=None, enable_gqa=False):
    """SDPA's Python signature, used only to bind a node's args and kwargs by name."""


_SDPA_SIGNATURE = inspect.signature(_sdpa_signature)


# ---------------------------------------------------------------------------------- report

class Rewritten(NamedTuple):
    node: str
    layer: int
    q_shape: tuple
    kv_shape: tuple    # shape of the k/v the op receives (after folding a head repeat)
    folded: str        # "" or the head-repeat pattern folded away ("expand+reshape", ...)


class Skipped(NamedTuple):
    node: str
    layer: int
    reason: str


@dataclass
class RewriteReport:
    """What ``rewrite_sdpa`` did: the rewritten SDPA nodes and, for the others, why not."""

    rewritten: list[Rewritten] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def table(self) -> str:
        rows = [("layer", "node", "action", "detail")]
        entries = [(r.layer, r.node, "flash_prefill",
                    f"q {_fmt_shape(r.q_shape)} kv {_fmt_shape(r.kv_shape)}"
                    + (f" (folded {r.folded})" if r.folded else "")) for r in self.rewritten]
        entries += [(s.layer, s.node, "dense", s.reason) for s in self.skipped]
        rows += [(str(layer), node, action, detail)
                 for layer, node, action, detail in sorted(entries, key=lambda e: e[0])]
        widths = [max(len(row[c]) for row in rows) for c in range(3)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3]
                 for row in rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        head = (f"flashprefill: {len(self.rewritten)} SDPA call(s) rewritten, "
                f"{len(self.skipped)} left dense")
        return head if not (self.rewritten or self.skipped) else head + "\n" + self.table()


def plain_shape(shape) -> tuple:
    """A shape with symbolic sizes as strings ("s27"), so a report holds no fake-mode state."""
    return tuple(s if isinstance(s, int) else str(s) for s in shape)


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


# ------------------------------------------------------------------------------ predicates

def _is_sdpa_node(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


def _meta_value(node: Any) -> Any:
    """The fake tensor (or SymInt) a node stands for, or None when it has none."""
    if not isinstance(node, torch.fx.Node):
        return node
    return node.meta.get("example_value", node.meta.get("val"))


def _known_eq(a, b) -> bool:
    """a == b provable without adding a guard (plain == for ints)."""
    return statically_known_true(sym_eq(a, b))


def _known_divisible(a, b) -> bool:
    return statically_known_true(sym_eq(a % b, 0))


def _is_float_tensor(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in _FLOAT_DTYPES


def _is_python_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def sdpa_skip_reason(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False, *, gqa_folded: bool = False,
                     check_grad: bool = True) -> Optional[str]:
    """Why an SDPA call with these (fake) arguments cannot become flash_prefill; None if it can.

    q (B, H, S_q, D); k, v (B, Hkv, S_kv, D). ``gqa_folded``: k/v are the un-repeated tensors of
    a head repeat folded away by the pass, so H != Hkv is grouped-query attention even without
    ``enable_gqa``.
    """
    if attn_mask is not None:
        return "attn_mask given"
    if is_causal is not True:
        return "not causal" if is_causal is False else "is_causal is not a constant"
    if not _is_python_number(dropout_p):
        return "dropout_p is not a constant"
    if dropout_p != 0:
        return f"dropout_p={dropout_p} (training)"
    if scale is not None and not _is_python_number(scale):
        return "scale is not a constant"
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return "inputs without tensor metadata"
    if not all(t.dim() == 4 for t in (q, k, v)):
        return "not 4-D (B, H, S, D)"
    if not all(_is_float_tensor(t) for t in (q, k, v)):
        return "not a floating dtype"
    if not (q.dtype == k.dtype == v.dtype):
        return "q/k/v dtypes differ"
    if not (q.device == k.device == v.device):
        return "q/k/v devices differ"
    S_q, S_kv = q.shape[2], k.shape[2]
    if not _known_eq(S_kv, v.shape[2]):
        return "key and value lengths differ"
    if not _known_eq(S_q, S_kv):
        if isinstance(S_q, int) and S_q == 1:
            return "decode (q_len 1)"
        if isinstance(S_q, int) and isinstance(S_kv, int):
            return f"S_q != S_kv ({S_q} vs {S_kv}: chunked prefill or KV cache)"
        return "S_q == S_kv not provable without a guard"
    if not (_known_eq(q.shape[0], k.shape[0]) and _known_eq(q.shape[0], v.shape[0])):
        return "batch sizes differ (broadcast)"
    if not (_known_eq(q.shape[3], k.shape[3]) and _known_eq(q.shape[3], v.shape[3])):
        return "head dims differ"
    H, Hkv = q.shape[1], k.shape[1]
    if not _known_eq(Hkv, v.shape[1]):
        return "key and value head counts differ"
    if not _known_eq(H, Hkv):
        if not (enable_gqa or gqa_folded):
            return "GQA without enable_gqa"
        if not _known_divisible(H, Hkv):
            return "query heads not a provable multiple of kv heads"
    if check_grad and any(t.requires_grad for t in (q, k, v)):
        return "requires grad"
    return None


# --------------------------------------------------------------------- head-repeat folding

def _is_full_slice(x) -> bool:
    return isinstance(x, slice) and x == slice(None, None, None)


def _is_unsqueeze_dim2(node: torch.fx.Node) -> bool:
    """x[:, :, None] (with trailing full slices / Ellipsis) or x.unsqueeze(2) on a 4-D x."""
    if node.op == "call_function" and node.target is operator.getitem:
        index = node.args[1]
        if not isinstance(index, tuple):
            return False
        index = list(index)
        while index and (_is_full_slice(index[-1]) or index[-1] is Ellipsis):
            index.pop()
        return (len(index) == 3 and _is_full_slice(index[0]) and _is_full_slice(index[1])
                and index[2] is None)
    if (node.op == "call_method" and node.target == "unsqueeze") or (
            node.op == "call_function" and node.target is torch.unsqueeze):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return dim == 2
    return False


def _is_expand(node: torch.fx.Node) -> bool:
    return node.op == "call_method" and node.target == "expand"


def _is_reshape(node: torch.fx.Node) -> bool:
    return ((node.op == "call_method" and node.target in ("reshape", "view"))
            or (node.op == "call_function" and node.target is torch.reshape))


def _is_repeat_interleave(node: torch.fx.Node) -> bool:
    return ((node.op == "call_method" and node.target == "repeat_interleave")
            or (node.op == "call_function" and node.target in (torch.repeat_interleave,
                                                               torch.Tensor.repeat_interleave)))


def _same_dims(a, b, dims) -> bool:
    return all(_known_eq(a.shape[i], b.shape[i]) for i in dims)


def _fold_expand_reshape(node: torch.fx.Node):
    """HF's repeat_kv: x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d) -> (x, chain)."""
    if not _is_reshape(node) or not isinstance(node.args[0], torch.fx.Node):
        return None
    expand = node.args[0]
    if not _is_expand(expand) or not isinstance(expand.args[0], torch.fx.Node):
        return None
    unsq = expand.args[0]
    if not _is_unsqueeze_dim2(unsq) or not isinstance(unsq.args[0], torch.fx.Node):
        return None
    base = unsq.args[0]
    x, u, e, out = (_meta_value(n) for n in (base, unsq, expand, node))
    if not all(isinstance(t, torch.Tensor) for t in (x, u, e, out)):
        return None
    if (x.dim(), u.dim(), e.dim(), out.dim()) != (4, 5, 5, 4):
        return None
    # the expand broadcasts the new dim only: b, h, s, d keep their sizes
    if not (_known_eq(u.shape[2], 1) and _same_dims(e, u, (0, 1, 3, 4))):
        return None
    # merging (h, n) head-major: repeated head i reads x's head i // n, as GQA does
    if not (_same_dims(out, x, (0, 2, 3)) and _known_eq(out.shape[1], x.shape[1] * e.shape[2])):
        return None
    return base, (node, expand, unsq), "expand+reshape"


def _fold_repeat_interleave(node: torch.fx.Node):
    """x.repeat_interleave(n, dim=1) with an int n -> (x, chain)."""
    if not _is_repeat_interleave(node):
        return None
    args = list(node.args) + [None] * 3
    base = args[0]
    repeats = node.kwargs.get("repeats", args[1])
    dim = node.kwargs.get("dim", args[2])
    if not isinstance(base, torch.fx.Node) or isinstance(repeats, (torch.fx.Node, bool)):
        return None
    if not isinstance(repeats, int) or repeats < 1 or dim not in (1, -3):
        return None
    x, out = _meta_value(base), _meta_value(node)
    if not (isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor)):
        return None
    if x.dim() != 4 or out.dim() != 4 or not _known_eq(out.shape[1], x.shape[1] * repeats):
        return None
    return base, (node,), "repeat_interleave"


def _unrepeated(node: Any):
    """(base node, chain of repeat nodes, pattern name) if ``node`` repeats a tensor's heads."""
    if not isinstance(node, torch.fx.Node):
        return None
    return _fold_expand_reshape(node) or _fold_repeat_interleave(node)


# ---------------------------------------------------------------------------------- the pass

def normalize_sdpa_args(node: torch.fx.Node) -> dict[str, Any]:
    """The node's arguments bound to SDPA's signature, defaults filled in."""
    bound = _SDPA_SIGNATURE.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _sdpa_nodes(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    return [n for n in graph.nodes if _is_sdpa_node(n)]


def _values(args: dict[str, Any]) -> dict[str, Any]:
    """Node arguments -> their fake values (tensors), constants as they are."""
    return {name: (_meta_value(a) if isinstance(a, torch.fx.Node) else a)
            for name, a in args.items()}


def _plan(node: torch.fx.Node, layer: int, config: FlashPrefillConfig):
    """Decide one node: (layer config, q, k, v nodes, scale, folded chains, pattern) or a reason."""
    args = normalize_sdpa_args(node)
    values = _values(args)
    if isinstance(args["attn_mask"], torch.fx.Node) and values["attn_mask"] is None:
        values["attn_mask"] = args["attn_mask"]      # a mask node without metadata is a mask
    k_node, v_node, chains, pattern = args["key"], args["value"], (), ""
    fk, fv = _unrepeated(k_node), _unrepeated(v_node)
    if fk and fv:
        kb, vb = _meta_value(fk[0]), _meta_value(fv[0])
        if _known_eq(kb.shape[1], vb.shape[1]):
            k_node, v_node, chains, pattern = fk[0], fv[0], (fk[1], fv[1]), fk[2]
            values = dict(values, key=kb, value=vb)
    reason = sdpa_skip_reason(values["query"], values["key"], values["value"],
                              values["attn_mask"], values["dropout_p"], values["is_causal"],
                              values["scale"], values["enable_gqa"], gqa_folded=bool(chains))
    if reason is None and chains:
        # the gradient check must see the tensors SDPA saw, not only the folded bases
        original = _values(args)
        if original["key"].requires_grad or original["value"].requires_grad:
            reason = "requires grad"
    if reason is not None:
        return reason
    layer_config = config.for_layer(layer)
    if layer_config is None:
        return "dense layer"
    return layer_config, args["query"], k_node, v_node, args["scale"], chains, pattern, values


def _replace(graph: torch.fx.Graph, node: torch.fx.Node, layer: int, plan) -> Rewritten:
    layer_config, q, k, v, scale, chains, pattern, values = plan
    op = torch.ops.fp_compile.flash_prefill.default
    with graph.inserting_before(node):
        new = graph.call_function(op, (q, k, v, scale, *op_config_args(layer_config), layer))
    try:
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
    except BaseException:
        graph.erase_node(new)
        raise
    graph.erase_node(node)
    erased = set()
    for chain in chains:
        for dead in chain:                  # outermost first: each becomes unused in turn
            if dead not in erased and not dead.users:
                graph.erase_node(dead)
                erased.add(dead)
    return Rewritten(node.name, layer, plain_shape(values["query"].shape),
                     plain_shape(values["key"].shape), pattern)


def rewrite_sdpa(gm: torch.fx.GraphModule,
                 config: FlashPrefillConfig | None = None) -> RewriteReport:
    """Rewrite ``gm``'s eligible SDPA calls into ``fp_compile.flash_prefill``, in place.

    Eligible: is_causal=True, no attn_mask, dropout_p == 0, 4-D floating inputs, S_q == S_kv
    provable without a guard, equal head dims, equal head counts or GQA (enable_gqa=True, or a
    head repeat of k/v folded away), nothing requiring grad (the op has no backward), and the
    layer not in ``config.dense_layers``. A failure while handling one node leaves that node
    dense, with a warning and the reason in the report; it never fails the compile.
    """
    from torch._dynamo.utils import counters

    config = config or FlashPrefillConfig()
    report = RewriteReport()
    graph = gm.graph
    for layer, node in enumerate(_sdpa_nodes(graph)):
        name = node.name
        try:
            plan = _plan(node, layer, config)
            if isinstance(plan, str):
                report.skipped.append(Skipped(name, layer, plan))
            else:
                report.rewritten.append(_replace(graph, node, layer, plan))
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
    return report
