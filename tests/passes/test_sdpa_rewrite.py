"""The SDPA -> flash_prefill FX pass on dynamo graphs (no Inductor: the rewritten graph runs as is).

Each test compiles with a capturing backend that runs ``rewrite_sdpa`` and returns the graph's
forward, then checks the report (what was rewritten, why the rest was not), the counters, the
graph contents and the numbers against eager.
"""

import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import fp_compile
from fp_compile import RewriteReport
from fp_compile.passes import sdpa_rewrite
from tests.helpers import assert_close
from tests.passes.graphs import ALPHA, EXACT, capture, op_nodes, qkv, reasons, sdpa_nodes

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def mixed(q, k, v):
    """One SDPA call of each kind; layers in call order."""
    kr, vr = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    mask = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).triu()      # not causal
    outs = [
        F.scaled_dot_product_attention(q, kr, vr, is_causal=True),                  # 0 rewrite
        F.scaled_dot_product_attention(q[:, :, -1:], k, v, is_causal=True,
                                       enable_gqa=True),                            # 1 decode
        F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask),                   # 2 mask
        F.scaled_dot_product_attention(q, kr, vr),                                   # 3 non-causal
        F.scaled_dot_product_attention(q[:, :, -20:], k, v, is_causal=True,
                                       enable_gqa=True),                            # 4 chunk
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),    # 5 rewrite
    ]
    return sum(o.sum(dim=2) for o in outs), outs[0], outs[5]


def test_mixed_graph_rewrites_causal_unmasked_prefill_only():
    q, k, v = qkv()
    backend, seen = capture()
    got = torch.compile(mixed, backend=backend, fullgraph=True)(q, k, v)
    want = mixed(q, k, v)
    (gm, report), = seen
    assert [r.layer for r in report.rewritten] == [0, 5], report
    why = reasons(report)
    assert set(why) == {1, 2, 3, 4}, report
    assert why == {1: "decode (q_len 1)", 2: "attn_mask not causal", 3: "not causal",
                   4: "S_q != S_kv (20 vs 70: chunked prefill or KV cache)"}, report
    assert counters["flashprefill"]["sdpa_rewritten"] == 2
    assert counters["flashprefill"]["sdpa_skipped"] == 4
    assert len(op_nodes(gm)) == 2 and len(sdpa_nodes(gm)) == 4
    assert [n.args[-1] for n in op_nodes(gm)] == [0, 5]          # the layer argument
    for a, b, what in zip(got, want, ("sum", "layer 0", "layer 5")):
        assert_close(a, b, 1e-5, 1e-5, what)
    text = str(report)
    assert "2 SDPA call(s) rewritten, 4 left dense" in text and "decode" in text


class Attention(torch.nn.Module):
    """Projections + SDPA with dropout in training, as models write it."""

    def __init__(self, dim=32, heads=4, kv_heads=2, layers=3):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.qkv = torch.nn.ModuleList(
            torch.nn.Linear(dim, (heads + 2 * kv_heads) * self.hd) for _ in range(layers))

    def forward(self, x):
        B, S, _ = x.shape
        for proj in self.qkv:
            q, k, v = proj(x).view(B, S, -1, self.hd).transpose(1, 2).split(
                [self.heads, self.kv_heads, self.kv_heads], dim=1)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                               dropout_p=0.1 if self.training else 0.0)
            x = x + y.transpose(1, 2).reshape(B, S, -1)
        return x


def test_dropout_in_training_stays_dense():
    torch.manual_seed(0)
    model = Attention().train()
    backend, seen = capture()
    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(torch.randn(1, 40, 32))
    (_, report), = seen
    assert not report.rewritten
    assert [s.reason for s in report.skipped] == ["dropout_p=0.1 (training)"] * 3, report


def test_requires_grad_stays_dense_and_runs_backward():
    torch.manual_seed(0)
    model = Attention(layers=1).eval()
    x = torch.randn(1, 40, 32)
    backend, seen = capture()
    out = torch.compile(model, backend=backend, fullgraph=True)(x)
    (gm, report), = seen
    assert [s.reason for s in report.skipped] == ["requires grad"], report
    assert not op_nodes(gm)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).square().sum().backward()
    for got, p in zip(grads, model.parameters()):
        assert_close(got, p.grad, 1e-5, 1e-5, "grad")


def test_dense_layers_and_layer_alpha():
    torch.manual_seed(0)
    model = Attention(layers=3).eval()
    cfg = EXACT.replace(alpha=0.9, sink_blocks=1, window_blocks=1, last_dense_blocks=0,
                        dense_layers=(1,), layer_alpha=((2, 0.0),))
    backend, seen = capture(cfg)
    x = torch.randn(1, 160, 32)
    with torch.no_grad():
        got = torch.compile(model, backend=backend, fullgraph=True)(x)
    (gm, report), = seen
    assert reasons(report) == {1: "dense layer"}
    nodes = op_nodes(gm)
    assert [n.args[-1] for n in nodes] == [0, 2]
    assert [n.args[ALPHA] for n in nodes] == [0.9, 0.0]
    assert len(sdpa_nodes(gm)) == 1

    # the same model, eager, with each layer's config: alpha 0.9 is really sparse at layer 0
    layer = [0]

    class Expect(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.scaled_dot_product_attention:
                lc = cfg.for_layer(layer[0])
                layer[0] += 1
                if lc is not None:
                    return fp_compile.flash_prefill(*args, enable_gqa=True, config=lc)
            return func(*args, **kwargs)

    with torch.no_grad(), Expect():
        want = model(x)
    with torch.no_grad():
        dense = model(x)
    assert_close(got, want, 1e-5, 1e-5, "vs eager flash_prefill per layer")
    assert (got - dense).abs().max() > 1e-4, "alpha 0.9 should drop some blocks"


def test_symbolic_lengths_not_provably_equal_stay_dense():
    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q = torch.randn(1, 2, 40, 16)
    k = torch.randn(1, 2, 48, 16)
    backend, seen = capture()
    got = torch.compile(attn, backend=backend, dynamic=True, fullgraph=True)(q, k, k)
    (_, report), = seen
    assert not report.rewritten
    assert reasons(report) == {0: "S_q == S_kv not provable without a guard"}, report
    assert_close(got, attn(q, k, k), 1e-6, 1e-6)


def test_shared_symbolic_length_is_rewritten():
    w = torch.randn(16, 3 * 32) / 4

    def attn(x):
        B, S, _ = x.shape
        q, k, v = (x @ w).view(B, S, 3, 2, 16).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    backend, seen = capture()
    compiled = torch.compile(attn, backend=backend, dynamic=True, fullgraph=True)
    for S in (37, 70):
        x = torch.randn(2, S, 16)
        assert_close(compiled(x), attn(x), 1e-5, 1e-5, f"S={S}")
    assert len(seen) == 1
    assert len(seen[0][1].rewritten) == 1, seen[0][1]


def test_a_failing_node_stays_dense_with_a_warning(monkeypatch):
    real = sdpa_rewrite._replace

    def flaky(graph, node, layer, plan):
        if layer == 0:
            raise RuntimeError("boom")
        return real(graph, node, layer, plan)

    monkeypatch.setattr(sdpa_rewrite, "_replace", flaky)
    q, k, v = qkv()
    backend, seen = capture()
    with pytest.warns(UserWarning, match="boom"):
        got = torch.compile(mixed, backend=backend, fullgraph=True)(q, k, v)
    (gm, report), = seen
    assert reasons(report)[0] == "pass error: RuntimeError: boom", report
    assert [r.layer for r in report.rewritten] == [5]
    for a, b in zip(got, mixed(q, k, v)):
        assert_close(a, b, 1e-5, 1e-5)


def test_graph_without_sdpa_is_untouched():
    def f(x):
        return x.softmax(-1) * 2

    backend, seen = capture()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.compile(f, backend=backend)(torch.randn(3, 5))
    (_, report), = seen
    assert isinstance(report, RewriteReport) and not report.rewritten and not report.skipped
    assert counters["flashprefill"]["sdpa_rewritten"] == 0




def test_decisions_are_logged_on_the_fp_compile_logger(caplog):
    q, k, v = qkv()
    backend, _ = capture()
    with caplog.at_level(logging.DEBUG, logger="fp_compile"):
        torch.compile(mixed, backend=backend, fullgraph=True)(q, k, v)
    ours = [r for r in caplog.records if r.name == "fp_compile"]
    info = [r.getMessage() for r in ours if r.levelno == logging.INFO]
    debug = [r.getMessage() for r in ours if r.levelno == logging.DEBUG]
    assert info == ["flashprefill: 2 SDPA call(s) rewritten, 4 left dense"], info
    assert len(debug) == 4, debug
    assert "layer 1" in debug[0] and "decode (q_len 1)" in debug[0], debug
    assert "layer 4" in debug[3] and "S_q != S_kv (20 vs 70" in debug[3], debug
