"""The causal ``attn_mask`` prover: is an SDPA mask computed in the graph exactly the causal mask?

Hugging Face (and other models) build the causal mask from sizes while dynamo traces and call
SDPA with ``is_causal=False, attn_mask=mask``. Such a call is flash_prefill's call if the mask
is, for every length the graph can run at, the lower-triangular (S, S) mask: boolean ``j <= i``,
or additive (0 on and below the diagonal; -inf or finfo.min above). ``causal_mask_reason``
decides that without adding a guard: the mask's subgraph must read sizes only (no tensor data, no
randomness, nothing written in place), and it is evaluated at a few concrete sizes
(``_mask_trials``) chosen so an offset diagonal or a sliding window cannot pass as causal.
"""

from __future__ import annotations

import operator
import re
from typing import Optional

import sympy
import torch
import torch.fx
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.multiprocessing.reductions import StorageWeakRef

from .fx_utils import FLOAT_DTYPES, is_float_tensor, is_python_number, known_eq, meta_value

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


def _mask_subgraph(mask: torch.fx.Node, data: Optional[set] = None):
    """The mask's ancestry: (nodes in graph order, size leaves). Raises unless it reads sizes only.

    Leaves are size symbols (SymInt placeholders) and nodes reading a tensor's sizes; every other
    ancestor must be a pure, deterministic call. ``data``: a set that collects tensor inputs
    (placeholders) as leaves too, instead of refusing them (the span prover gives them trial
    values).
    """
    seen, leaves, todo = {mask}, set(), [mask]
    while todo:
        node = todo.pop()
        value = meta_value(node)
        if (node.op == "placeholder" and (_is_sym(value) or is_python_number(value))) or (
                _reads_sizes(node)):
            leaves.add(node)
            continue
        if data is not None and node.op == "placeholder" and isinstance(value, torch.Tensor):
            leaves.add(node)
            data.add(node)
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
    storages = {StorageWeakRef(v.untyped_storage()) for v in map(meta_value, nodes)
                if isinstance(v, torch.Tensor)}
    inside = set(nodes) - leaves
    for node in mask.graph.nodes:
        if node in inside or not _mutates(node):
            continue
        for arg in [a for w in _written_args(node) for a in (w if isinstance(w, (tuple, list))
                                                              else (w,))]:
            value = meta_value(arg) if isinstance(arg, torch.fx.Node) else None
            if isinstance(value, torch.Tensor) and (
                    StorageWeakRef(value.untyped_storage()) in storages):
                raise _NotFromSizes(f"written by {node.name}")


def _evaluate(nodes, leaves, subs: dict, values: Optional[dict] = None):
    """Run the mask's subgraph eagerly, its size leaves set to concrete sizes (and its tensor
    leaves to ``values``)."""
    env = dict(values or {})
    for node in nodes:
        if node in env:
            continue
        if node in leaves:
            env[node] = _concrete(meta_value(node), subs)
            continue
        args, kwargs = torch.fx.map_arg((node.args, node.kwargs), env.__getitem__)
        if node.op == "call_method":
            env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            env[node] = node.target(*args, **kwargs)
    return env[nodes[-1]]


def is_causal_mask(m, S: int) -> bool:
    """m (..., S, S) is the lower-triangular mask: boolean, or additive (0; -inf or min above)."""
    if not isinstance(m, torch.Tensor) or m.dim() < 2 or tuple(m.shape[-2:]) != (S, S):
        return False
    i = torch.arange(S, device=m.device)
    tril = i[None, :] <= i[:, None]
    if m.dtype == torch.bool:
        return bool((m == tril).all())
    if m.dtype not in FLOAT_DTYPES:
        return False
    blocked = (m == float("-inf")) | (m == torch.finfo(m.dtype).min)
    return bool(torch.where(tril, m == 0, blocked).all())


def _mask_trials(nodes, leaves, q, k) -> list[dict]:
    """The size assignments to evaluate the mask at: the traced sizes, and with size symbols
    also 2 and 3 everywhere and one length beyond every integer constant in the subgraph (a
    window or an offset up to that constant cannot pass as causal); other symbols stay 2 there."""
    symbols = _symbols([meta_value(n) for n in leaves] + [q.shape[2], k.shape[2]])
    trials = [dict(symbols)]
    if symbols:
        seq = set(_symbols([q.shape[2], k.shape[2]]))
        big = 2 * max([1] + [c for n in nodes if n not in leaves
                             for c in _int_constants((n.args, n.kwargs))]) + 5
        trials += [dict.fromkeys(symbols, v) for v in (2, 3)]
        trials.append({s: big if s in seq else 2 for s in symbols})
    return [{s: sympy.Integer(v) for s, v in subs.items()} for subs in trials]


def causal_mask_reason(mask: torch.fx.Node, q, k) -> Optional[str]:
    """None if the SDPA ``attn_mask`` node ``mask`` provably is the causal mask for q (B, H, S, D)
    and k (S_kv == S), else why not.

    Only a mask computed in the graph from sizes qualifies; one that reads any tensor's data
    (e.g. a padding attention_mask) or is written in place is "attn_mask given" as before. Its
    subgraph is evaluated at each of ``_mask_trials``; each result must equal the causal mask
    ("attn_mask not causal" otherwise; "attn_mask not provably causal" when the check cannot
    run). Nothing adds a guard.
    """
    m = meta_value(mask)
    if not (isinstance(m, torch.Tensor) and (m.dtype == torch.bool or is_float_tensor(m))):
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
            known_eq(a, b) or (i >= 2 and known_eq(a, 1))
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
                if not is_causal_mask(value, _concrete(q.shape[2], subs)):
                    return "attn_mask not causal"
    except _NotProvable as e:
        return f"attn_mask not provably causal ({e})"
    except Exception as e:  # noqa: BLE001  (any failure to evaluate: not proven)
        return f"attn_mask not provably causal ({type(e).__name__})"
    return None


def mask_chain(mask: torch.fx.Node) -> tuple:
    """The mask's pure ancestry, outermost first: the pass erases it once nothing uses it."""
    nodes, _ = _mask_subgraph(mask, set())
    return tuple(n for n in reversed(nodes) if n.op != "placeholder")
