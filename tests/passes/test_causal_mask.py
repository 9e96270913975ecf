"""The causal attn_mask prover, through the pass: masks built from sizes are folded only when
they equal the causal mask at every length the graph can run at."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fp_compile.config import SPAN_UNSUPPORTED
from fp_compile.passes.causal_mask import is_causal_mask
from fp_compile.passes.fx_utils import normalize_sdpa_args
from tests.helpers import assert_close
from tests.passes.graphs import EXACT, capture, op_nodes, qkv, reasons, sdpa_nodes

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


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
    length = report.rewritten[0].q_shape[2]
    assert isinstance(length, str) and length.startswith("s"), "the length must stay symbolic"
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


def padded(q, k, v, keep):
    """SDPA with the causal mask AND-ed with a (B, S) key-padding mask, as models build it."""
    S = q.shape[2]
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    mask = causal[None, None] & keep[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def test_attn_mask_reading_a_padding_mask_becomes_a_padded_call():
    q, k, v = qkv(B=2, S=40)
    keep = torch.ones(2, 40, dtype=torch.bool)          # no padding: the values still decide
    backend, seen = capture()
    got = torch.compile(padded, backend=backend, fullgraph=True)(q, k, v, keep)
    (gm, report), = seen
    assert [r.form for r in report.rewritten] == ["padded"] and not report.skipped, report
    assert len(sdpa_nodes(gm)) == 0
    assert_close(got, padded(q, k, v, keep), 1e-4, 1e-4)


@pytest.mark.parametrize("name", SPAN_UNSUPPORTED)
def test_a_padded_call_stays_dense_with_an_option_spans_refuse(name):
    # the op would raise on the call (spans._check_config); the pass leaves it and says why
    q, k, v = qkv(B=2, S=40)
    keep = torch.ones(2, 40, dtype=torch.bool)
    value = 6.0 if name == "slash_probe" else True
    backend, seen = capture(EXACT.replace(**{name: value}))
    got = torch.compile(padded, backend=backend, fullgraph=True)(q, k, v, keep)
    (gm, report), = seen
    assert not report.rewritten and [s.reason for s in report.skipped] == [
        f"padded call: {name} is not supported with a span"], report
    assert len(sdpa_nodes(gm)) == 1
    assert_close(got, padded(q, k, v, keep), 1e-6, 1e-6)


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


# ------------------------------------------------------------------ properties (hypothesis)

def band_mask(how, S, offset, window, device=None):
    """Keys j with j <= i + offset and (window None or j > i - window), built from S only, as
    ``how`` says: the causal mask exactly when offset == 0 and the window covers the prompt."""
    if how == "tril":
        keep = torch.ones(S, S, dtype=torch.bool, device=device).tril(offset)
        if window is not None:
            keep = keep & ~torch.ones(S, S, dtype=torch.bool, device=device).tril(-window)
        return keep
    i = torch.arange(S, device=device)
    keep = i[None, :] <= i[:, None] + offset
    if window is not None:
        keep = keep & (i[None, :] > i[:, None] - window)
    if how == "arange":
        return keep
    if how == "additive -inf":
        return torch.zeros(S, S, device=device).masked_fill(~keep, float("-inf"))
    assert how == "additive min"
    return torch.full((S, S), torch.finfo(torch.float32).min, device=device).masked_fill(keep, 0.0)


MASK_HOWS = ["tril", "arange", "additive -inf", "additive min"]


@settings(max_examples=60, deadline=None)
@given(how=st.sampled_from(MASK_HOWS), S=st.integers(1, 50), offset=st.integers(-3, 3),
       window=st.none() | st.integers(1, 60))
def test_is_causal_mask_accepts_exactly_the_causal_mask(how, S, offset, window):
    m = band_mask(how, S, offset, window)
    i = torch.arange(S)
    causal = i[None, :] <= i[:, None]
    keep = m if m.dtype == torch.bool else m == 0
    assert is_causal_mask(m, S) == bool(torch.equal(keep, causal))


class BandAttention(torch.nn.Module):
    """SDPA under a ``band_mask``; offset and window are module attributes, which dynamo bakes
    into the graph as constants (a closure int becomes a graph input under dynamic=True)."""

    def __init__(self, how, offset, window):
        super().__init__()
        self.how, self.offset, self.window = how, offset, window

    def forward(self, q, k, v):
        mask = band_mask(self.how, q.shape[2], self.offset, self.window, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


@settings(max_examples=10, deadline=None)
@given(how=st.sampled_from(MASK_HOWS), S=st.integers(2, 40),
       offset=st.sampled_from([0, 0, -1, 1, 2]), window=st.none() | st.integers(1, 48), dynamic=st.booleans())
@example(how="arange", S=40, offset=0, window=64, dynamic=True)   # causal at S=40, not at 65
@example(how="tril", S=9, offset=0, window=8, dynamic=False)      # one key short of causal
def test_prover_folds_exactly_the_masks_equal_to_causal(how, S, offset, window, dynamic):
    """A mask traced from sizes is folded iff it equals the causal mask at every length the
    graph can run at: the traced length for a static graph, every length for a dynamic one."""
    attn = BandAttention(how, offset, window)
    torch._dynamo.reset()       # hypothesis runs many examples in one test call
    q, k, v = qkv(S=S)
    backend, seen = capture()
    got = torch.compile(attn, backend=backend, dynamic=dynamic, fullgraph=True)(q, k, v)
    (_, report), = seen
    causal = offset == 0 and (window is None or (not dynamic and window >= S))
    if causal:
        assert len(report.rewritten) == 1 and not report.skipped, report
        assert report.rewritten[0].folded == "causal attn_mask"
    else:
        assert not report.rewritten and reasons(report) == {0: "attn_mask not causal"}, report
    assert_close(got, attn(q, k, v), 1e-5, 1e-5)


def test_offset_that_is_a_graph_input_is_not_trusted():
    """Under dynamic=True dynamo lifts a closure int to a SymInt input: the graph then serves
    every offset, so a mask causal only at offset 0 must stay dense."""
    offset = 0

    def attn(q, k, v):
        mask = band_mask("tril", q.shape[2], offset, None, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    backend, seen = capture()
    q, k, v = qkv(S=20)
    got = torch.compile(attn, backend=backend, dynamic=True, fullgraph=True)(q, k, v)
    (_, report), = seen
    assert reasons(report) == {0: "attn_mask not causal"}, report
    assert_close(got, attn(q, k, v), 1e-5, 1e-5)
