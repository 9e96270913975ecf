"""Small graph and metadata predicates shared by the SDPA passes.

They read only node targets and fake-tensor metadata (``meta["example_value"]`` in dynamo graphs,
``meta["val"]`` in export graphs), so none of them evaluates a tensor or adds a shape guard.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true, sym_eq

# The dtypes flash_prefill takes (its kernels accumulate in fp32 or fp64).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# SDPA as dynamo records it (the C binding or the Python wrapper) and as export records it.
SDPA_TARGETS = (
    torch._C._nn.scaled_dot_product_attention,
    torch.nn.functional.scaled_dot_product_attention,
    torch.ops.aten.scaled_dot_product_attention.default,
)


def _sdpa_signature(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                    scale=None, enable_gqa=False):
    """SDPA's Python signature, used only to bind a node's args and kwargs by name."""


_SDPA_SIGNATURE = inspect.signature(_sdpa_signature)


def is_sdpa_node(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


def sdpa_nodes(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """The graph's SDPA nodes in graph (execution) order."""
    return [n for n in graph.nodes if is_sdpa_node(n)]


def normalize_sdpa_args(node: torch.fx.Node) -> dict[str, Any]:
    """The node's arguments bound to SDPA's signature, defaults filled in."""
    bound = _SDPA_SIGNATURE.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def meta_value(node: Any) -> Any:
    """The fake tensor (or SymInt) a node stands for, None when it has none; a non-node as is."""
    if not isinstance(node, torch.fx.Node):
        return node
    return node.meta.get("example_value", node.meta.get("val"))


def meta_values(args: dict[str, Any]) -> dict[str, Any]:
    """Node arguments -> their fake values (tensors), constants as they are."""
    return {name: meta_value(a) for name, a in args.items()}


def known_eq(a, b) -> bool:
    """a == b provable without adding a guard (plain == for ints)."""
    return statically_known_true(sym_eq(a, b))


def known_divisible(a, b) -> bool:
    """a % b == 0 provable without adding a guard; b must not be 0."""
    return statically_known_true(sym_eq(a % b, 0))


def same_dims(a: torch.Tensor, b: torch.Tensor, dims) -> bool:
    """a.shape[i] == b.shape[i] provable for every i in ``dims``."""
    return all(known_eq(a.shape[i], b.shape[i]) for i in dims)


def is_float_tensor(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in FLOAT_DTYPES


def is_python_number(x) -> bool:
    """An int or float constant (bool excluded: True is not a dropout probability)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def plain_shape(shape) -> tuple:
    """A shape with symbolic sizes as strings ("s27"), so a report holds no fake-mode state."""
    return tuple(s if isinstance(s, int) else str(s) for s in shape)
