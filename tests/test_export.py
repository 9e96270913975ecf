"""apply_flashprefill on torch.export programs: rewrite, report, save/load, AOTInductor on CPU."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import fp_compile  # noqa: F401  (registers the op: needed to run and to load saved programs)
from fp_compile import FlashPrefillConfig, apply_flashprefill
from fp_compile.export import last_report
from fp_compile.ops import OP_CONFIG_FIELDS
from tests.helpers import assert_close

EXACT = FlashPrefillConfig(alpha=0.0, block_size=16, min_seq_len=0)
OP = torch.ops.fp_compile.flash_prefill.default
SDPA = torch.ops.aten.scaled_dot_product_attention.default


@pytest.fixture(autouse=True)
def _fresh_counters():
    counters.clear()
    yield
    counters.clear()


class Mixed(torch.nn.Module):
    """Layers: 0 causal GQA (rewrite), 1 non-causal, 2 last-token query (decode-shaped),
    3 causal GQA (rewrite)."""

    def __init__(self, dim=32, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.proj = torch.nn.Linear(dim, (heads + 2 * kv_heads) * self.hd)

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = self.proj(x).view(B, S, -1, self.hd).transpose(1, 2).split(
            [self.heads, self.kv_heads, self.kv_heads], dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        b = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        c = F.scaled_dot_product_attention(q[:, :, -1:], k, v, is_causal=True, enable_gqa=True)
        d = F.scaled_dot_product_attention(q * 0.5, k, v, is_causal=True, enable_gqa=True)
        return (a + b + c + d).transpose(1, 2).reshape(B, S, -1)


def exported(S=70, dynamic=True):
    torch.manual_seed(0)
    model = Mixed().eval()
    x = torch.randn(1, S, 32)
    shapes = {"x": {1: torch.export.Dim("seq", min=2, max=512)}} if dynamic else None
    with torch.no_grad():
        ep = torch.export.export(model, (x,), dynamic_shapes=shapes)
    return model, x, ep


def targets(ep):
    return [n.target for n in ep.graph.nodes if n.op == "call_function"]


def test_rewrites_eligible_calls_with_layers_report_and_counters():
    model, x, ep = exported()
    before = targets(ep)
    new = apply_flashprefill(ep, EXACT)
    assert targets(ep) == before, "the input program must not change"
    assert targets(new).count(OP) == 2 and targets(new).count(SDPA) == 2
    layers = [n.args[-1] for n in new.graph.nodes if n.target is OP]
    assert layers == [0, 3]
    report = new.flashprefill_report
    assert report is last_report()
    assert [r.layer for r in report.rewritten] == [0, 3]
    why = {s.layer: s.reason for s in report.skipped}
    assert why == {1: "not causal", 2: "decode (q_len 1)"}, report
    assert counters["flashprefill"]["sdpa_rewritten"] == 2
    assert counters["flashprefill"]["sdpa_skipped"] == 2
    with torch.no_grad():
        for S in (70, 33):          # one program, two lengths
            xs = torch.randn(1, S, 32)
            assert_close(new.module()(xs), model(xs), 1e-5, 1e-5, f"S={S}")


def test_dense_layers_and_layer_alpha():
    _, _, ep = exported(dynamic=False)
    cfg = EXACT.replace(dense_layers=(0,), layer_alpha=((3, 0.5),))
    new = apply_flashprefill(ep, cfg)
    (node,) = [n for n in new.graph.nodes if n.target is OP]
    assert node.args[-1] == 3
    assert node.args[4 + OP_CONFIG_FIELDS.index("alpha")] == 0.5
    assert {s.layer: s.reason for s in new.flashprefill_report.skipped}[0] == "dense layer"


def test_save_load_round_trip(tmp_path):
    model, x, ep = exported()
    new = apply_flashprefill(ep, EXACT)
    path = tmp_path / "flashprefill.pt2"
    torch.export.save(new, path)
    loaded = torch.export.load(path)
    assert targets(loaded).count(OP) == 2
    with torch.no_grad():
        assert_close(loaded.module()(x), model(x), 1e-5, 1e-5)


def test_aot_inductor_cpu_package(tmp_path):
    model, x, ep = exported()
    new = apply_flashprefill(ep, EXACT)
    path = torch._inductor.aoti_compile_and_package(
        new, package_path=str(tmp_path / "flashprefill_aoti.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        for S in (70, 41):
            xs = torch.randn(1, S, 32)
            assert_close(runner(xs), model(xs), 1e-5, 1e-5, f"AOTI S={S}")
