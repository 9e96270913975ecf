"""Layer numbers: the model's layer index (from the module stack), the same in every graph."""

import pytest
import torch
import torch.nn.functional as F

from fp_compile.passes.layers import layer_numbers, module_index
from tests.helpers import assert_close
from tests.passes.graphs import EXACT, OP, capture, op_nodes, qkv, reasons, sdpa_nodes

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


class Attn(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


class Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attn()

    def forward(self, q, k, v):
        return self.attn(q, k, v)


class Decoder(torch.nn.Module):
    """Two decoder layers in a ModuleList, optionally with a graph break between them."""

    def __init__(self, graph_break: bool):
        super().__init__()
        self.layers = torch.nn.ModuleList(Layer() for _ in range(2))
        self.graph_break = graph_break

    def forward(self, q, k, v):
        q = self.layers[0](q, k, v)
        if self.graph_break:
            torch._dynamo.graph_break()
        return self.layers[1](q, k, v)


@pytest.mark.parametrize("graph_break", [True, False])
def test_dense_layers_apply_to_the_model_layer_across_a_graph_break(graph_break):
    q, k, v = qkv(S=40)
    backend, seen = capture(EXACT.replace(dense_layers=(1,)))
    model = Decoder(graph_break)
    with torch.no_grad():
        got = torch.compile(model, backend=backend)(q, k, v)
        want = model(q, k, v)
    assert len(seen) == (2 if graph_break else 1)
    rewritten = [r.layer for _, report in seen for r in report.rewritten]
    skipped = {layer: why for _, report in seen for layer, why in reasons(report).items()}
    assert rewritten == [0] and skipped == {1: "dense layer"}, [str(r) for _, r in seen]
    assert [n.args[-1] for gm, _ in seen for n in op_nodes(gm)] == [0]
    assert_close(got, want, 1e-5, 1e-5)


class Shared(torch.nn.Module):
    """One attention module called twice: both calls would be "layer 3"."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Identity() for _ in range(3))
        self.blocks.append(Attn())

    def forward(self, q, k, v):
        return self.blocks[3](self.blocks[3](q, k, v), k, v)


def test_one_module_calling_sdpa_twice_falls_back_to_graph_order():
    backend, seen = capture()
    with torch.no_grad():
        torch.compile(Shared(), backend=backend, fullgraph=True)(*qkv(S=40))
    (gm, report), = seen
    assert [r.layer for r in report.rewritten] == [0, 1], report


class Reversed(Decoder):
    """Calls layers[1] before layers[0]: graph order and module index disagree."""

    def forward(self, q, k, v):
        return self.layers[0](self.layers[1](q, k, v), k, v)


def test_export_numbers_layers_by_module_index():
    from fp_compile import apply_flashprefill

    with torch.no_grad():
        ep = torch.export.export(Reversed(graph_break=False), qkv(S=40))
    assert list(layer_numbers(ep.graph).values()) == [1, 0]
    new = apply_flashprefill(ep, EXACT.replace(dense_layers=(1,)))
    report = new.flashprefill_report
    assert [r.layer for r in report.rewritten] == [0] and reasons(report) == {1: "dense layer"}
    first, second = sdpa_nodes(ep.graph_module)
    # layers[1] runs first: its call is the one left dense
    assert report.skipped[0].node == first.name and report.rewritten[0].node == second.name
    (op,) = [n for n in new.graph.nodes if n.op == "call_function" and n.target is OP]
    assert op.args[-1] == 0


@pytest.mark.parametrize("path, index", [
    ("L['self'].layers.1.attn", 1),
    ("L['self'].model.layers[12].self_attn", 12),
    ("L['self']._modules['layers']._modules['7'].attn", 7),
    ("layers.3.attn", 3),
    ("L['self'].layer1.attn", None),        # a name with digits is not an index
    ("L['self'].attn", None),
    ("", None),
])
def test_module_index_reads_the_first_integer_path_component(path, index):
    graph = torch.fx.Graph()
    node = graph.placeholder("x")
    node.meta["nn_module_stack"] = {"outer": ("L['self']", torch.nn.Module),
                                    "inner": (path, torch.nn.Module)}
    assert module_index(node) == index
