"""Head-repeat folding: repeated k/v become the un-repeated tensors and GQA in the op."""

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_close
from tests.passes.graphs import capture, op_nodes, qkv

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


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
