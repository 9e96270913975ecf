"""The FX pass: causal, unmasked, prefill-shaped SDPA calls -> ``torch.ops.fp_compile.flash_prefill``.

Works on dynamo graphs (torch IR, before AOT autograd), where an SDPA call is one
``call_function`` node with the arguments as the user wrote them and fake tensors in
``meta["example_value"]`` (``meta["val"]`` in export graphs). Every SDPA node is numbered by its
order in the graph (the "layer"); each one is either rewritten or left dense with a reason, both
recorded in the returned ``RewriteReport`` and counted in
``torch._dynamo.utils.counters["flashprefill"]``.

The eligibility rules (``sdpa_skip_reason``) read only tensor metadata, so the export path
(``fp_compile.export``) applies the same rules to the fake tensors it is handed. The FX pass also
accepts ``is_causal=False`` with an ``attn_mask`` built in the graph from sizes only that provably
is the causal mask (Hugging Face builds one while dynamo traces: ``_causal_mask_reason``).
"""

from __future__ import annotations

import inspect
import operator
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

import sympy
import torch
import torch.fx
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx.experimental.symbolic_shapes import statically_known_true, sym_eq
from torch.multiprocessing.reductions import StorageWeakRef

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
    folded: str        # "" or what was folded away ("expand+reshape", "causal attn_mask", ...)


class Skipped(NamedTuple):
    node: str
    layer: int
    reason: str


@dataclass
class RewriteReport:
    """What ``rewrite_sdpa`` did: the rewritten SDPA nodes and, for the others, why not."""

    rewritten: list[Rewritten] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    graphs: int = 1

    @classmethod
    def merge(cls, reports: list["RewriteReport"]) -> "RewriteReport":
        """One report for several graphs (graph breaks, prefill and decode graphs)."""
        merged = cls(graphs=sum(r.graphs for r in reports))
        for r in reports:
            merged.rewritten.extend(r.rewritten)
            merged.skipped.extend(r.skipped)
        return merged

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
                f"{len(self.skipped)} left dense"
                + (f" in {self.graphs} graphs" if self.graphs > 1 else ""))
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


# ------------------------------------------------------------------- causal attn_mask folding

# Checking a mask evaluates it: a trial whose mask has more elements than this is not run.
MASK_CHECK_MAX_NUMEL = 1 << 32

_SIZE_METHODS = ("size", "dim", "numel", "ndimension", "nelement")
_SIZE_FUNCTIONS = (torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default,
                   torch.Tensor.size, torch.Tensor.dim, torch.numel)
_INPLACE_NAMES = ("add", "and", "floordiv", "lshift", "mod", "mul", "matmul", "or", "pow", "rshift",
                  "sub", "truediv", "xor")
_INPLACE_OPERATORS = (operator.setitem, operator.delitem,
                      *(getattr(operator, f"i{name}") for name in _INPLACE_NAMES))
_INPLACE_DUNDERS = ("__setitem__", "__delitem__", *(f"__i{name}__" for name in _INPLACE_NAMES))
_RANDOM = re.compile(r"rand|bernoulli|normal|dropout|multinomial|uniform|exponential|poisson"
                     r"|cauchy|geometric")
_SYM_TYPES = {torch.SymInt: int, torch.SymFloat: float, torch.SymBool: bool}


class _NotProvable(Exception):
    """The mask cannot be shown to be the causal mask; the message says why."""


class _NotFromSizes(_NotProvable):
    """The mask reads a tensor's data (a padding attention_mask, a buffer, ...) or is written in
    place: any mask, as far as the pass can tell."""


def _target_name(node: torch.fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else str(getattr(target, "__name__", target))


def _reads_sizes(node: torch.fx.Node) -> bool:
    """x.size(), x.shape, sym_size(x, d), ...: reads a tensor's metadata, never its data."""
    if node.op == "call_method":
        return node.target in _SIZE_METHODS
    if node.op != "call_function":
        return False
    if node.target is getattr:
        return len(node.args) > 1 and node.args[1] in ("shape", "ndim")
    return node.target in _SIZE_FUNCTIONS


def _mutates(node: torch.fx.Node) -> bool:
    """The node may write into one of its arguments (in-place op, setitem, out=)."""
    if node.op not in ("call_function", "call_method"):
        return False
    if "out" in node.kwargs:
        return True
    if node.op == "call_function":
        if isinstance(node.target, torch._ops.OpOverload):
            return node.target._schema.is_mutable
        if getattr(node.target, "__module__", None) in ("operator", "_operator"):
            return node.target in _INPLACE_OPERATORS      # and_, or_, ... are not in place
    name = _target_name(node)
    return name in _INPLACE_DUNDERS or (name.endswith("_") and not name.endswith("__"))


def _is_sym(x) -> bool:
    return type(x) in _SYM_TYPES


def _symbols(x) -> dict:
    """The size symbols in x (a SymInt, a shape, ...), each with its hint (the traced size)."""
    if isinstance(x, (tuple, list)):
        return {s: h for item in x for s, h in _symbols(item).items()}
    if not _is_sym(x):
        return {}
    shape_env = x.node.shape_env
    hints = getattr(shape_env, "backed_var_to_val", None)
    hints = shape_env.var_to_val if hints is None else hints
    if any(s not in hints for s in x.node.expr.free_symbols):
        raise _NotProvable("unbacked size")
    return {s: hints[s] for s in x.node.expr.free_symbols}


def _concrete(x, subs: dict):
    """x (a SymInt, a shape, ...) with its size symbols replaced by the values in ``subs``."""
    if isinstance(x, (tuple, list)):
        return type(x)([_concrete(item, subs) for item in x])
    if not _is_sym(x):
        return x
    expr = x.node.expr.xreplace(subs)
    if expr.free_symbols:
        raise _NotProvable("unbound size")
    return _SYM_TYPES[type(x)](expr)


def _int_constants(arg) -> list[int]:
    """The absolute values of the Python ints in a node's (nested) arguments."""
    if isinstance(arg, (tuple, list)):
        return [c for item in arg for c in _int_constants(item)]
    if isinstance(arg, dict):
        return _int_constants(list(arg.values()))
    if isinstance(arg, slice):
        return _int_constants([arg.start, arg.stop, arg.step])
    return [abs(arg)] if isinstance(arg, int) and not isinstance(arg, bool) else []


def _mask_subgraph(mask: torch.fx.Node):
    """The mask's ancestry: (nodes in graph order, size leaves). Raises unless it reads sizes only.

    Leaves are size symbols (SymInt placeholders) and nodes reading a tensor's sizes; every other
    ancestor must be a pure, deterministic call.
    """
    seen, leaves, todo = {mask}, set(), [mask]
    while todo:
        node = todo.pop()
        value = _meta_value(node)
        if (node.op == "placeholder" and (_is_sym(value) or _is_python_number(value))) or (
                _reads_sizes(node)):
            leaves.add(node)
            continue
        if node.op not in ("call_function", "call_method"):
            raise _NotFromSizes(node.op)            # a tensor input, a buffer, a submodule
        if node.is_impure() or _mutates(node) or _RANDOM.search(_target_name(node)):
            raise _NotProvable(f"computed with {_target_name(node)}")
        for arg in node.all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                todo.append(arg)
    return [n for n in mask.graph.nodes if n in seen], leaves


def _written_args(node: torch.fx.Node) -> list:
    """The arguments an in-place node may write into (``_mutates(node)`` is true)."""
    if isinstance(node.target, torch._ops.OpOverload):
        schema = node.target._schema.arguments
        writes = {a.name for a in schema if a.alias_info is not None and a.alias_info.is_write}
        return ([arg for arg, a in zip(node.args, schema) if a.name in writes]
                + [arg for name, arg in node.kwargs.items() if name in writes])
    return list(node.args[:1]) + [node.kwargs.get("out")]


def _check_not_mutated(mask: torch.fx.Node, nodes, leaves) -> None:
    """No in-place op in the graph writes into a tensor (or a view) of the mask's subgraph."""
    storages = {StorageWeakRef(v.untyped_storage()) for v in map(_meta_value, nodes)
                if isinstance(v, torch.Tensor)}
    inside = set(nodes) - leaves
    for node in mask.graph.nodes:
        if node in inside or not _mutates(node):
            continue
        for arg in [a for w in _written_args(node) for a in (w if isinstance(w, (tuple, list))
                                                              else (w,))]:
            value = _meta_value(arg) if isinstance(arg, torch.fx.Node) else None
            if isinstance(value, torch.Tensor) and (
                    StorageWeakRef(value.untyped_storage()) in storages):
                raise _NotFromSizes(f"written by {node.name}")


def _evaluate(nodes, leaves, subs: dict):
    """Run the mask's subgraph eagerly, its size leaves set to concrete sizes."""
    env = {}
    for node in nodes:
        if node in leaves:
            env[node] = _concrete(_meta_value(node), subs)
            continue
        args, kwargs = torch.fx.map_arg((node.args, node.kwargs), env.__getitem__)
        if node.op == "call_method":
            env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            env[node] = node.target(*args, **kwargs)
    return env[nodes[-1]]


def _is_causal_mask(m, S: int) -> bool:
    """m (..., S, S) is the lower-triangular mask: boolean, or additive (0; -inf or min above)."""
    if not isinstance(m, torch.Tensor) or m.dim() < 2 or tuple(m.shape[-2:]) != (S, S):
        return False
    i = torch.arange(S, device=m.device)
    tril = i[None, :] <= i[:, None]
    if m.dtype == torch.bool:
        return bool((m == tril).all())
    if m.dtype not in _FLOAT_DTYPES:
        return False
    blocked = (m == float("-inf")) | (m == torch.finfo(m.dtype).min)
    return bool(torch.where(tril, m == 0, blocked).all())


def _mask_trials(nodes, leaves, q, k) -> list[dict]:
    """The size assignments to evaluate the mask at: the traced sizes, and with size symbols
    also 2 and 3 everywhere and one length beyond every integer constant in the subgraph (a
    window or an offset up to that constant cannot pass as causal); other symbols stay 2 there."""
    symbols = _symbols([_meta_value(n) for n in leaves] + [q.shape[2], k.shape[2]])
    trials = [dict(symbols)]
    if symbols:
        seq = set(_symbols([q.shape[2], k.shape[2]]))
        big = 2 * max([1] + [c for n in nodes if n not in leaves
                             for c in _int_constants((n.args, n.kwargs))]) + 5
        trials += [dict.fromkeys(symbols, v) for v in (2, 3)]
        trials.append({s: big if s in seq else 2 for s in symbols})
    return [{s: sympy.Integer(v) for s, v in subs.items()} for subs in trials]


def _causal_mask_reason(mask: torch.fx.Node, q, k) -> Optional[str]:
    """None if the SDPA ``attn_mask`` node ``mask`` provably is the causal mask for q (B, H, S, D)
    and k (S_kv == S), else why not.

    Only a mask computed in the graph from sizes qualifies; one that reads any tensor's data
    (e.g. a padding attention_mask) or is written in place is "attn_mask given" as before. Its
    subgraph is evaluated at each of ``_mask_trials``; each result must equal the causal mask
    ("attn_mask not causal" otherwise; "attn_mask not provably causal" when the check cannot
    run). Nothing adds a guard.
    """
    m = _meta_value(mask)
    if not (isinstance(m, torch.Tensor) and (m.dtype == torch.bool or _is_float_tensor(m))):
        return "attn_mask given"
    try:
        nodes, leaves = _mask_subgraph(mask)
        _check_not_mutated(mask, nodes, leaves)
    except _NotFromSizes:
        return "attn_mask given"
    except _NotProvable as e:
        return f"attn_mask not provably causal ({e})"
    # it must broadcast to SDPA's (B, H, S, S) scores without broadcasting them
    out = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if not 2 <= m.dim() <= 4 or not all(
            _known_eq(a, b) or (i >= 2 and _known_eq(a, 1))
            for i, (a, b) in enumerate(zip(reversed(m.shape), reversed(out)))):
        return "attn_mask not provably causal (shape)"
    try:
        trials = _mask_trials(nodes, leaves, q, k)
        for subs in trials:
            numel = 1
            for size in _concrete(tuple(m.shape), subs):
                numel *= size
            if numel > MASK_CHECK_MAX_NUMEL:
                if subs is trials[0] and len(trials) > 1:
                    continue                        # a long traced prompt: the other lengths do
                return "attn_mask not provably causal (too large to check)"
            with unset_fake_temporarily(), torch.no_grad():
                value = _evaluate(nodes, leaves, subs)
                if not _is_causal_mask(value, _concrete(q.shape[2], subs)):
                    return "attn_mask not causal"
    except _NotProvable as e:
        return f"attn_mask not provably causal ({e})"
    except Exception as e:  # noqa: BLE001  (any failure to evaluate: not proven)
        return f"attn_mask not provably causal ({type(e).__name__})"
    return None


def _mask_chain(mask: torch.fx.Node) -> tuple:
    """The mask's pure ancestry, outermost first: erased by ``_replace`` once nothing uses it."""
    nodes, _ = _mask_subgraph(mask)
    return tuple(n for n in reversed(nodes) if n.op != "placeholder")


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


def _plan(node: torch.fx.Node, layer: int, config: FlashPrefillConfig,
          mask_reasons: Optional[dict] = None):
    """Decide one node: (layer config, q, k, v nodes, scale, folded chains, pattern) or a reason.

    ``mask_reasons`` caches ``_causal_mask_reason`` per mask (models share one across layers).
    """
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
    mask = args["attn_mask"]
    if (reason == "attn_mask given" and values["is_causal"] is False
            and isinstance(mask, torch.fx.Node)):
        # the call as if is_causal=True without the mask: eligible if the mask is the causal one
        if sdpa_skip_reason(values["query"], values["key"], values["value"], None,
                            values["dropout_p"], True, values["scale"], values["enable_gqa"],
                            gqa_folded=bool(chains)) is None:
            mask_reasons = {} if mask_reasons is None else mask_reasons
            key = (mask, plain_shape(values["query"].shape), plain_shape(values["key"].shape))
            if key not in mask_reasons:
                mask_reasons[key] = _causal_mask_reason(mask, values["query"], values["key"])
            reason = mask_reasons[key]
            if reason is None:
                chains += (_mask_chain(mask),)
                pattern = ", ".join(filter(None, (pattern, "causal attn_mask")))
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
    for layer, node in enumerate(_sdpa_nodes(graph)):
        name = node.name
        try:
            plan = _plan(node, layer, config, mask_reasons)
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
