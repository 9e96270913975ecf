"""The SDPA -> flash_prefill FX pass on dynamo graphs (no Inductor: the rewritten graph runs as is).

Each test compiles with a capturing backend that runs ``rewrite_sdpa`` and returns the graph's
forward, then checks the report (what was rewritten, why the rest was not), the counters, the
graph contents and the numbers against eager.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import fp_compile
from fp_compile import FlashPrefillConfig, RewriteReport, rewrite_sdpa
from fp_compile.ops import OP_CONFIG_FIELDS
from fp_compile.passes import sdpa_rewrite
from fp_compile.passes.eligibility import sdpa_skip_reason
from fp_compile.passes.fx_utils import is_sdpa_node, normalize_sdpa_args
from tests.helpers import assert_close

# alpha 0 keeps every causal block: the op equals dense attention up to rounding
EXACT = FlashPrefillConfig(alpha=0.0, block_size=16, min_seq_len=0)
OP = torch.ops.fp_compile.flash_prefill.default
ALPHA = 4 + OP_CONFIG_FIELDS.index("alpha")     # position of alpha in the op's arguments


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


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
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g),
            torch.randn(B, Hkv, S, D, generator=g))


def reasons(report):
    return {s.layer: s.reason for s in report.skipped}


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
    assert "decode" in why[1]
    assert "attn_mask" in why[2]
    assert "not causal" in why[3]
    assert "S_q != S_kv" in why[4]
    assert counters["flashprefill"]["sdpa_rewritten"] == 2
    assert counters["flashprefill"]["sdpa_skipped"] == 4
    assert len(op_nodes(gm)) == 2 and len(sdpa_nodes(gm)) == 4
    assert [n.args[-1] for n in op_nodes(gm)] == [0, 5]          # the layer argument
    for a, b, what in zip(got, want, ("sum", "layer 0", "layer 5")):
        assert_close(a, b, 1e-5, 1e-5, what)
    text = str(report)
    assert "2 SDPA call(s) rewritten, 4 left dense" in text and "decode" in text


def test_repeat_kv_expand_reshape_is_folded_into_gqa():
    def repeat_kv(x, n):             # Hugging Face's repeat_kv
        b, h, s, d = x.shape
        return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)

    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, repeat_kv(k, 4), repeat_kv(v, 4), is_causal=True)

    q, k, v = qkv(B=2, H=8, Hkv=2, S=50)
    backend, seen = capture()
    got = torch.compile(attn, backend=backend, fullgraph=True)(q, k, v)
    (gm, report), = seen
    (node,) = op_nodes(gm)
    kv_heads = [node.args[i].meta["example_value"].shape[1] for i in (1, 2)]
    assert kv_heads == [2, 2], "the op must get the un-repeated k/v"
    assert report.rewritten[0].folded == "expand+reshape"
    assert not any(n.op == "call_method" and n.target in ("expand", "reshape")
                   for n in gm.graph.nodes), gm.code
    assert_close(got, attn(q, k, v), 1e-5, 1e-5)


def test_repeat_interleave_is_folded_and_tile_is_not():
    def interleaved(q, k, v):
        return F.scaled_dot_product_attention(q, torch.repeat_interleave(k, 2, 1),
                                              v.repeat_interleave(2, dim=1), is_causal=True)

    def tiled(q, k, v):
        # head h reads kv head h % Hkv: not GQA's grouping, so it must not be folded
        return F.scaled_dot_product_attention(q, k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1),
                                              is_causal=True)

    q, k, v = qkv(H=4, Hkv=2, S=40)
    for fn, folded, heads in ((interleaved, "repeat_interleave", 2), (tiled, "", 4)):
        torch._dynamo.reset()
        backend, seen = capture()
        got = torch.compile(fn, backend=backend, fullgraph=True)(q, k, v)
        (gm, report), = seen
        (node,) = op_nodes(gm)
        assert report.rewritten[0].folded == folded, report
        assert node.args[1].meta["example_value"].shape[1] == heads
        assert_close(got, fn(q, k, v), 1e-5, 1e-5, fn.__name__)


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
    assert all("dropout" in s.reason for s in report.skipped), report


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
    assert "not provable" in report.skipped[0].reason, report
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
    assert "pass error" in reasons(report)[0] and "boom" in reasons(report)[0]
    assert [r.layer for r in report.rewritten] == [5]
    for a, b in zip(got, mixed(q, k, v)):
        assert_close(a, b, 1e-5, 1e-5)


def causal_mask(kind, S, device=None):
    """The causal mask of an S-token prompt, built from sizes only as models build it."""
    if kind == "hf":        # Hugging Face's sdpa_mask while dynamo traces (torch < 2.14)
        i = torch.arange(S, device=device)
        return (i[None, None, None, :] <= i[None, None, :, None]).expand(1, -1, S, S)
    if kind == "additive min":
        return torch.full((S, S), torch.finfo(torch.float32).min, device=device).triu(1)
    tril = torch.ones(S, S, dtype=torch.bool, device=device).tril()
    if kind == "additive -inf":
        return torch.zeros(S, S, device=device).masked_fill(~tril, float("-inf"))
    assert kind == "tril"
    return tril


def masked_attention(kind):
    def attn(q, k, v):
        mask = causal_mask(kind, q.shape[2], q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return attn


@pytest.mark.parametrize("kind", ["hf", "tril", "additive -inf", "additive min"])
def test_causal_attn_mask_from_sizes_is_folded(kind):
    fn = masked_attention(kind)
    q, k, v = qkv(B=2, S=45)
    backend, seen = capture()
    got = torch.compile(fn, backend=backend, fullgraph=True)(q, k, v)
    (gm, report), = seen
    assert [r.layer for r in report.rewritten] == [0] and not report.skipped, report
    assert report.rewritten[0].folded == "causal attn_mask"
    assert "causal attn_mask" in str(report)
    assert not sdpa_nodes(gm) and len(op_nodes(gm)) == 1
    # the mask is dead once folded: nothing but the op and the inputs is left
    assert [n.op for n in gm.graph.nodes if n.op not in ("placeholder", "output")] == [
        "call_function"], gm.code
    assert_close(got, fn(q, k, v), 1e-5, 1e-5, kind)


def test_causal_attn_mask_with_dynamic_shapes_does_not_recompile():
    fn = masked_attention("hf")
    backend, seen = capture()
    compiled = torch.compile(fn, backend=backend, dynamic=True, fullgraph=True)
    for B, S in ((3, 37), (5, 70), (3, 100)):
        q, k, v = qkv(B=B, S=S)
        assert_close(compiled(q, k, v), fn(q, k, v), 1e-5, 1e-5, f"S={S}")
    (gm, report), = seen
    assert len(report.rewritten) == 1 and not report.skipped, report
    assert "s" in str(report.rewritten[0].q_shape[2]), "the length must stay symbolic"
    assert not sdpa_nodes(gm)


def band(S, lo, hi, device=None):
    """keys j with i - lo < j <= i + hi: causal for lo >= S, hi == 0."""
    i = torch.arange(S, device=device)
    return (i[None, :] <= i[:, None] + hi) & (i[None, :] > i[:, None] - lo)


@pytest.mark.parametrize("kind, mask, reason", [
    ("sliding window", lambda S: band(S, 8, 0), "attn_mask not causal"),
    ("tril offset", lambda S: torch.ones(S, S, dtype=torch.bool).tril(1), "attn_mask not causal"),
    ("triu", lambda S: torch.ones(S, S, dtype=torch.bool).triu(), "attn_mask not causal"),
    ("rows broadcast", lambda S: torch.ones(1, S, dtype=torch.bool),
     "attn_mask not provably causal (shape)"),
    ("random", lambda S: torch.ones(S, S, dtype=torch.bool).tril() & (torch.rand(S, S) >= 0),
     "attn_mask not provably causal (computed with rand)"),
])
def test_shape_only_masks_not_causal_stay_dense(kind, mask, reason):
    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask(q.shape[2]),
                                              enable_gqa=True)

    q, k, v = qkv(S=40)
    backend, seen = capture()
    got = torch.compile(attn, backend=backend, fullgraph=True)(q, k, v)
    (gm, report), = seen
    assert not report.rewritten and reasons(report) == {0: reason}, report
    assert len(sdpa_nodes(gm)) == 1
    if kind != "random":
        assert_close(got, attn(q, k, v), 1e-5, 1e-5, kind)


def test_window_wider_than_the_prompt_is_causal_only_for_that_length():
    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=band(q.shape[2], 64, 0),
                                              enable_gqa=True)

    q, k, v = qkv(S=40)
    for dynamic, rewritten in ((False, 1), (True, 0)):
        torch._dynamo.reset()
        backend, seen = capture()
        got = torch.compile(attn, backend=backend, dynamic=dynamic, fullgraph=True)(q, k, v)
        (_, report), = seen
        # static: the graph only runs at S=40, where the band is causal; dynamic: it is not
        # causal from S=65 on, which the check's long trial length shows
        assert len(report.rewritten) == rewritten, (dynamic, report)
        assert_close(got, attn(q, k, v), 1e-5, 1e-5, f"dynamic={dynamic}")


def test_attn_mask_reading_tensor_data_stays_dense():
    def padded(q, k, v, keep):
        S = q.shape[2]
        causal = torch.ones(S, S, dtype=torch.bool).tril()
        mask = causal[None, None] & keep[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    q, k, v = qkv(B=2, S=40)
    keep = torch.ones(2, 40, dtype=torch.bool)          # no padding: the values still decide
    backend, seen = capture()
    got = torch.compile(padded, backend=backend, fullgraph=True)(q, k, v, keep)
    (gm, report), = seen
    assert not report.rewritten and reasons(report) == {0: "attn_mask given"}, report
    assert len(sdpa_nodes(gm)) == 1
    assert_close(got, padded(q, k, v, keep), 1e-5, 1e-5)


def test_attn_mask_written_in_place_stays_dense():
    def attn(q, k, v):
        S = q.shape[2]
        mask = torch.ones(S, S, dtype=torch.bool).tril()
        mask[:, 1] = True                                 # row 0 now sees key 1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    q, k, v = qkv(S=40)
    backend, seen = capture()
    got = torch.compile(attn, backend=backend, fullgraph=True)(q, k, v)
    (_, report), = seen
    assert not report.rewritten and reasons(report) == {0: "attn_mask given"}, report
    assert_close(got, attn(q, k, v), 1e-5, 1e-5)


def test_causal_attn_mask_shared_with_a_dense_layer_is_kept():
    def two_layers(q, k, v):
        mask = causal_mask("hf", q.shape[2])
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return F.scaled_dot_product_attention(a, k, v, attn_mask=mask, enable_gqa=True)

    q, k, v = qkv(S=40)
    backend, seen = capture(EXACT.replace(dense_layers=(1,)))
    got = torch.compile(two_layers, backend=backend, fullgraph=True)(q, k, v)
    (gm, report), = seen
    assert [r.layer for r in report.rewritten] == [0] and reasons(report) == {1: "dense layer"}
    (node,) = sdpa_nodes(gm)
    assert normalize_sdpa_args(node)["attn_mask"] is not None
    assert_close(got, two_layers(q, k, v), 1e-5, 1e-5)


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


def meta(*shape, dtype=torch.float32, grad=False):
    return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)


@pytest.mark.parametrize("q, k, v, kwargs, reason", [
    (meta(1, 4, 32, 16), meta(1, 2, 32, 16), meta(1, 2, 32, 16), {}, "enable_gqa"),
    (meta(1, 6, 32, 16), meta(1, 4, 32, 16), meta(1, 4, 32, 16), {"enable_gqa": True},
     "multiple"),
    (meta(1, 4, 32, 16), meta(1, 4, 32, 8), meta(1, 4, 32, 8), {}, "head dims"),
    (meta(4, 32, 16), meta(4, 32, 16), meta(4, 32, 16), {}, "4-D"),
    (meta(1, 4, 32, 16, dtype=torch.int32),) * 3 + ({}, "floating"),
    (meta(1, 4, 32, 16), meta(1, 4, 32, 16, dtype=torch.float16),
     meta(1, 4, 32, 16), {}, "dtypes"),
    (meta(2, 4, 32, 16), meta(1, 4, 32, 16), meta(1, 4, 32, 16), {}, "batch"),
    (meta(1, 4, 32, 16, grad=True), meta(1, 4, 32, 16), meta(1, 4, 32, 16), {}, "grad"),
    (meta(1, 4, 32, 16), meta(1, 4, 32, 16), meta(1, 4, 32, 16), {"dropout_p": 0.1},
     "dropout"),
    (meta(1, 4, 32, 16), meta(1, 4, 32, 16), meta(1, 4, 32, 16), {"is_causal": False},
     "not causal"),
])
def test_skip_reasons(q, k, v, kwargs, reason):
    kwargs = {"is_causal": True, **kwargs}
    assert reason in sdpa_skip_reason(q, k, v, **kwargs)


def test_eligible_call_has_no_skip_reason():
    assert sdpa_skip_reason(meta(2, 8, 33, 64), meta(2, 2, 33, 64), meta(2, 2, 33, 64),
                            is_causal=True, enable_gqa=True, scale=0.2) is None
