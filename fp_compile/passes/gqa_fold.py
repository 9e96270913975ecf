"""Head-repeat folding: k/v repeated to H heads before SDPA -> the un-repeated (B, Hkv, S, D) tensors.

Models without ``enable_gqa`` repeat each kv head n times so k/v match q's H = Hkv * n heads.
flash_prefill takes grouped-query attention natively (heads of a group read the same k/v), so the
repeat is dropped from the graph and the op reads the un-repeated base. Only repeats that keep
GQA's head-major grouping (query head h reads kv head h // n) qualify; a ``repeat`` (tile, head h
reads kv head h % Hkv) is a different grouping and is left alone.
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple, Optional

import torch
import torch.fx

from .fx_utils import known_eq, meta_value, same_dims


class HeadRepeat(NamedTuple):
    """A foldable head repeat: its input ``base`` (B, Hkv, S, D), the nodes that do the repeat
    (outermost first, erased once unused) and the pattern's name for the report."""

    base: torch.fx.Node
    chain: tuple
    pattern: str

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


def _fold_expand_reshape(node: torch.fx.Node) -> Optional[HeadRepeat]:
    """HF's repeat_kv: x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d), x 4-D."""
    if not _is_reshape(node) or not isinstance(node.args[0], torch.fx.Node):
        return None
    expand = node.args[0]
    if not _is_expand(expand) or not isinstance(expand.args[0], torch.fx.Node):
        return None
    unsq = expand.args[0]
    if not _is_unsqueeze_dim2(unsq) or not isinstance(unsq.args[0], torch.fx.Node):
        return None
    base = unsq.args[0]
    x, u, e, out = (meta_value(n) for n in (base, unsq, expand, node))
    if not all(isinstance(t, torch.Tensor) for t in (x, u, e, out)):
        return None
    if (x.dim(), u.dim(), e.dim(), out.dim()) != (4, 5, 5, 4):
        return None
    # the expand broadcasts the new dim only: b, h, s, d keep their sizes
    if not (known_eq(u.shape[2], 1) and same_dims(e, u, (0, 1, 3, 4))):
        return None
    # merging (h, n) head-major: repeated head i reads x's head i // n, as GQA does
    if not (same_dims(out, x, (0, 2, 3)) and known_eq(out.shape[1], x.shape[1] * e.shape[2])):
        return None
    return HeadRepeat(base, (node, expand, unsq), "expand+reshape")


def _fold_repeat_interleave(node: torch.fx.Node) -> Optional[HeadRepeat]:
    """x.repeat_interleave(n, dim=1) with an int n, x 4-D."""
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
    x, out = meta_value(base), meta_value(node)
    if not (isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor)):
        return None
    if x.dim() != 4 or out.dim() != 4 or not known_eq(out.shape[1], x.shape[1] * repeats):
        return None
    return HeadRepeat(base, (node,), "repeat_interleave")


def unrepeated(node: Any) -> Optional[HeadRepeat]:
    """The head repeat ``node`` computes (an SDPA key or value argument), None if it is none."""
    if not isinstance(node, torch.fx.Node):
        return None
    return _fold_expand_reshape(node) or _fold_repeat_interleave(node)

