"""The "flashprefill" torch.compile backend: rewrite + Inductor, options, modes, config hygiene,
graph reports. Lookup by name through the entry point (a subprocess) and Hugging Face models
are end-to-end tests, in tests/e2e/."""

import functools
import importlib.metadata
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from fp_compile import FlashPrefillConfig, make_backend
from fp_compile.backend import flashprefill_backend, last_report, mode_config_patches
from fp_compile.ops import OP_CONFIG_FIELDS
from tests.helpers import assert_close

EXACT = {"alpha": 0.0, "block_size": 16, "min_seq_len": 0}
OP = torch.ops.fp_compile.flash_prefill.default


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


class TwoLayers(torch.nn.Module):
    """Layer 0: causal GQA prefill (rewritten); layer 1: explicit mask (left dense)."""

    def __init__(self, dim=32, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.proj = torch.nn.ModuleList(
            torch.nn.Linear(dim, (heads + 2 * kv_heads) * self.hd) for _ in range(2))

    def forward(self, x):
        B, S, _ = x.shape
        mask = torch.ones(S, S, dtype=torch.bool, device=x.device).tril(-1)
        mask[:, 0] = True
        for layer, proj in enumerate(self.proj):
            q, k, v = proj(x).view(B, S, -1, self.hd).transpose(1, 2).split(
                [self.heads, self.kv_heads, self.kv_heads], dim=1)
            if layer == 0:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            x = x + y.transpose(1, 2).reshape(B, S, -1)
        return x


def model_and_input(S=70, seed=0):
    torch.manual_seed(seed)
    return TwoLayers().eval(), torch.randn(2, S, 32)


def test_inductor_compile_matches_eager_and_leaves_global_config_alone():
    model, x = model_and_input()
    inductor_before = torch._inductor.config.get_config_copy()
    dynamo_before = torch._dynamo.config.get_config_copy()
    # mode and options together: only reachable by calling the backend directly
    backend = functools.partial(flashprefill_backend, mode="reduce-overhead", options=EXACT)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        got, (code,) = run_and_get_code(compiled, x)
        want = model(x)
    assert_close(got, want, 1e-4, 1e-4)
    assert counters["flashprefill"]["sdpa_rewritten"] == 1
    assert counters["flashprefill"]["sdpa_skipped"] == 1
    report = last_report()
    assert [r.layer for r in report.rewritten] == [0]
    assert [(s.layer, s.reason) for s in report.skipped] == [(1, "attn_mask given")]
    # on CPU the op's body is the opaque fp_compile::flash_prefill_eager, called from the code
    assert "flash_prefill_eager" in code
    assert torch._inductor.config.get_config_copy() == inductor_before
    assert torch._dynamo.config.get_config_copy() == dynamo_before


def test_unknown_option_raises_listing_valid_options():
    model, x = model_and_input(S=20)
    gm = torch.fx.symbolic_trace(torch.nn.Identity())
    with pytest.raises(ValueError, match="alpah.*valid options.*block_size"):
        flashprefill_backend(gm, [x], options={"alpah": 0.1})
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="alpah") as failed:
        torch.compile(model, backend=flashprefill_backend, options={"alpah": 0.1})(x)
    assert isinstance(failed.value.inner_exception, ValueError)
    with pytest.raises(ValueError, match="alpha"):
        flashprefill_backend(gm, [x], options={"alpha": 2.0})


def test_mode_maps_onto_inductor_settings():
    assert mode_config_patches(None) == {}
    assert mode_config_patches("default") == {}
    assert mode_config_patches("reduce-overhead") == {"triton.cudagraphs": True}
    assert mode_config_patches("max-autotune") == torch._inductor.list_mode_options(
        "max-autotune")
    assert mode_config_patches("max-autotune")["max_autotune"] is True
    with pytest.raises(RuntimeError, match="mode"):
        mode_config_patches("fastest-please")


@pytest.fixture
def fake_inductor(monkeypatch):
    """compile_fx replaced by a recorder that runs the (rewritten) graph as is."""
    import torch._inductor.compile_fx  # noqa: F401  (not imported yet when run alone)

    calls = []

    def compile_fx(gm, example_inputs, config_patches=None, **kwargs):
        calls.append((gm, config_patches))
        return gm.forward

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", compile_fx)
    return calls


def test_options_and_mode_reach_the_op_and_inductor(fake_inductor):
    model, x = model_and_input()
    with torch.no_grad():
        torch.compile(model, backend="flashprefill" if _entry_point_installed()
                      else flashprefill_backend, mode="max-autotune")(x)
        torch._dynamo.reset()
        opts = dict(EXACT, alpha=0.25, block_size=32)
        torch.compile(model, backend=flashprefill_backend, options=opts)(x)
    (_, patches_mode), (gm, patches_opts) = fake_inductor
    assert patches_mode == torch._inductor.list_mode_options("max-autotune")
    assert patches_opts == {}
    (node,) = [n for n in gm.graph.nodes if n.target is OP]
    args = dict(zip(OP_CONFIG_FIELDS, node.args[4:]))
    assert (args["alpha"], args["block_size"], args["min_seq_len"]) == (0.25, 32, 0)


def test_make_backend_binds_a_config_object(fake_inductor):
    model, x = model_and_input()
    cfg = FlashPrefillConfig(alpha=0.0, block_size=16, min_seq_len=0, dense_layers=(0,))
    with torch.no_grad():
        got = torch.compile(model, backend=make_backend(cfg), fullgraph=True)(x)
        assert_close(got, model(x), 1e-5, 1e-5)
        torch._dynamo.reset()
        # options given to torch.compile override the bound config
        torch.compile(model, backend=make_backend(cfg), options={"dense_layers": ()})(x)
    (gm0, _), (gm1, _) = fake_inductor
    assert not [n for n in gm0.graph.nodes if n.target is OP]
    assert last_report().rewritten[0].layer == 0
    assert len([n for n in gm1.graph.nodes if n.target is OP]) == 1
    with pytest.raises(TypeError):
        make_backend({"alpha": 0.1})
    with pytest.raises(ValueError, match="valid options"):
        make_backend(cfg)(gm0, [x], options={"nope": 1})


def test_graph_needing_grad_stays_dense_and_backward_matches_eager():
    model, x = model_and_input(S=40)
    compiled = torch.compile(model, backend=flashprefill_backend, options=EXACT)
    compiled(x).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    assert counters["flashprefill"]["sdpa_rewritten"] == 0
    assert {s.reason for s in last_report().skipped} == {"requires grad", "attn_mask given"}
    model.zero_grad()
    model(x).square().sum().backward()
    for got, p in zip(grads, model.parameters()):
        assert_close(got, p.grad, 1e-4, 1e-4, "grad")


def _entry_point_installed() -> bool:
    return any(e.name == "flashprefill"
               for e in importlib.metadata.entry_points(group="torch_dynamo_backends"))


class BrokenTwoLayers(TwoLayers):
    """TwoLayers with a graph break between the layers, both causal: two graphs."""

    def layer(self, x, proj):
        B, S, _ = x.shape
        q, k, v = proj(x).view(B, S, -1, self.hd).transpose(1, 2).split(
            [self.heads, self.kv_heads, self.kv_heads], dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return x + y.transpose(1, 2).reshape(B, S, -1)

    def forward(self, x):
        x = self.layer(x, self.proj[0])
        torch._dynamo.graph_break()
        return self.layer(x, self.proj[1])


def test_last_report_keeps_every_graph(fake_inductor):
    # bug: last_report() showed only the last graph (after generate(), the decode graph)
    torch.manual_seed(0)
    model, x = BrokenTwoLayers().eval(), torch.randn(1, 40, 32)
    backend = make_backend(FlashPrefillConfig(**EXACT))
    with torch.no_grad():
        torch.compile(model, backend=backend)(x)
    assert len(fake_inductor) == 2
    for report in (last_report(), backend.last_report()):
        assert report.graphs == 2
        assert len(report.rewritten) == 2 and not report.skipped, report
    assert "in 2 graphs" in str(last_report())
    assert len(backend.reports) == 2


def test_mode_with_options(fake_inductor):
    # torch.compile refuses mode= and options= together (the README said it worked): the mode
    # goes into options, or the config is bound with make_backend and mode= passed as usual
    model, x = model_and_input()
    with pytest.raises(RuntimeError, match="mode"):
        torch.compile(model, backend=flashprefill_backend, mode="reduce-overhead",
                      options=EXACT)
    with torch.no_grad():
        torch.compile(model, backend=flashprefill_backend,
                      options=dict(EXACT, mode="reduce-overhead"))(x)
        torch._dynamo.reset()
        torch.compile(model, backend=make_backend(FlashPrefillConfig(**EXACT)),
                      mode="reduce-overhead")(x)
    for gm, patches in fake_inductor:
        assert patches == {"triton.cudagraphs": True}
        assert len([n for n in gm.graph.nodes if n.target is OP]) == 1
    assert len(fake_inductor) == 2


def test_inference_with_grad_enabled_warns_once_per_backend(fake_inductor):
    torch.manual_seed(0)
    model, x = BrokenTwoLayers().eval(), torch.randn(1, 40, 32)
    backend = make_backend(FlashPrefillConfig(**EXACT))
    with pytest.warns(UserWarning, match="torch.no_grad") as caught:
        torch.compile(model, backend=backend)(x)
    grad_warnings = [w for w in caught if "require grad" in str(w.message)]
    assert len(grad_warnings) == 1              # two graphs, one warning
    assert {s.reason for s in backend.last_report().skipped} == {"requires grad"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")          # inference mode: no warning at all
        torch._dynamo.reset()
        torch.compile(model, backend=make_backend(FlashPrefillConfig(**EXACT)))(x)


def test_fake_kernel_checks_inputs_with_the_eager_message():
    from fp_compile.ops import op_config_args

    cfg = FlashPrefillConfig(**EXACT)

    def call(q, k, v):
        return torch.ops.fp_compile.flash_prefill(q, k, v, None, *op_config_args(cfg))

    q, k, v = torch.randn(1, 4, 32, 16), torch.randn(1, 2, 32, 16), torch.randn(1, 2, 32, 8)
    with pytest.raises(ValueError, match="head dim of value") as eager:
        call(q, k, v)
    # dynamo wraps the fake kernel's ValueError, keeping its type and message in the text
    with pytest.raises(torch._dynamo.exc.TorchRuntimeError,
                       match=r"got ValueError\('flash_prefill: head dim of value") as compiled:
        torch.compile(call, backend="eager", fullgraph=True)(q, k, v)
    assert str(eager.value) in str(compiled.value)
    # fewer queries than keys is a call with a span (a cached prefix); more is an error
    with pytest.raises(torch._dynamo.exc.TorchRuntimeError,
                       match=r"got ValueError\('flash_prefill: query has 32 tokens but key only"):
        torch.compile(call, backend="eager", fullgraph=True)(q, k[:, :, :16], v[:, :, :16, :])
