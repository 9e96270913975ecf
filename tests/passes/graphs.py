"""Helpers for the pass tests: a capturing backend that runs the pass, node finders, inputs."""

import torch

from fp_compile import FlashPrefillConfig, rewrite_sdpa
from fp_compile.ops import OP_CONFIG_FIELDS
from fp_compile.passes.fx_utils import is_sdpa_node

# alpha 0 keeps every causal block: the op equals dense attention up to rounding
EXACT = FlashPrefillConfig.paper_rule(alpha=0.0, block_size=16, min_seq_len=0)
OP = torch.ops.fp_compile.flash_prefill.default
ALPHA = 4 + OP_CONFIG_FIELDS.index("alpha")     # position of alpha in the op's arguments


def capture(config=EXACT):
    """A backend that runs the pass and keeps (graph, report) of every graph it sees."""
    seen = []

    def backend(gm, example_inputs):
        seen.append((gm, rewrite_sdpa(gm, config)))
        return gm.forward

    return backend, seen


def op_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is OP]


def sdpa_nodes(gm):
    return [n for n in gm.graph.nodes if is_sdpa_node(n)]


def qkv(B=1, H=4, Hkv=2, S=70, D=16, seed=0):
    """q (B, H, S, D), k and v (B, Hkv, S, D), float32, seeded."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g),
            torch.randn(B, Hkv, S, D, generator=g))


def reasons(report):
    return {s.layer: s.reason for s in report.skipped}


def meta(*shape, dtype=torch.float32, grad=False):
    return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)
