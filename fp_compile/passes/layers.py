"""Layer numbers for SDPA nodes: the same number for the same attention layer in every graph.

``FlashPrefillConfig.dense_layers`` and ``layer_alpha`` name layers of the *model*. A graph break
splits a model into several graphs, so numbering SDPA calls by their order in one graph would make
the first call of every graph "layer 0". Dynamo and export record, for every node, the module
stack that called it (``node.meta["nn_module_stack"]``: {key: (qualified path, module class)},
outermost first); decoder layers live in a ModuleList, so the innermost module's path carries the
layer's index: "L['self'].layers.1.attn" (dynamo, torch 2.13), "layers.1.attn" (export),
"L['self'].model.layers[1].self_attn" (older dynamo spellings).
"""

from __future__ import annotations

import re
from typing import Optional

import torch.fx

from .fx_utils import sdpa_nodes

# An integer path component: ".1" / "1." (attribute style) or "[1]" / "['1']" (index style).
# "layer1" or "h2o" are names, not indices: the digits must fill the whole component.
_INDEX = re.compile(r"(?:^|\.)(\d+)(?=$|[.\[])|\[['\"]?(\d+)['\"]?\]")


def module_index(node: torch.fx.Node) -> Optional[int]:
    """The first integer index in the path of the innermost module that called ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path, _ = list(stack.values())[-1]        # insertion order: outermost first
    match = _INDEX.search(str(path))
    return None if match is None else int(match.group(1) or match.group(2))


def layer_numbers(graph: torch.fx.Graph) -> dict[torch.fx.Node, int]:
    """Each SDPA node of ``graph`` -> its layer number, in graph order.

    The layer is ``module_index`` of the node (the ModuleList index of its decoder layer), which
    is the same in every graph of a model. The graph falls back to numbering its SDPA nodes in
    graph order (0, 1, ...; the rule for a bare attention module or a function) when any of its
    SDPA nodes has no such index, or when two of them would get the same number (one module
    calling SDPA twice): a partial or ambiguous numbering would let a ``dense_layers`` entry hit
    the wrong call.
    """
    nodes = sdpa_nodes(graph)
    indices = [module_index(n) for n in nodes]
    if None in indices or len(set(indices)) != len(indices):
        indices = list(range(len(nodes)))
    return dict(zip(nodes, indices))
