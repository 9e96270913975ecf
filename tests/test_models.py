"""The built-in gpt-fast-style model: prefill + KV-cache decode, planted structure, and
per-layer settings (dense_layers, layer_alpha) seen through explain() and the stats."""

import pytest
import torch

import fp_compile
from fp_compile import FlashPrefillConfig
from fp_compile.demo.models import ModelArgs, Transformer, generate, plant_attention_structure
from tests.helpers import assert_close

TINY = ModelArgs(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                 intermediate_size=128, max_seq_len=512)


def tiny_model(seed=0, args=TINY):
    torch.manual_seed(seed)
    return Transformer(args).eval()


def test_prefill_then_decode_equals_full_forward():
    model = tiny_model()
    ids = torch.randint(0, 128, (2, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        model.setup_caches(2, 64)
        pre = model(ids[:, :33], torch.arange(33))
        steps = [model(ids[:, t:t + 1], torch.tensor([t])) for t in range(33, 45)]
    assert_close(pre, full[:, :33], 1e-5, 1e-5, "prefill logits")
    assert_close(torch.cat(steps, 1), full[:, 33:], 1e-5, 1e-5, "decode logits")


def test_generate_is_greedy_continuation():
    model = tiny_model()
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(2))
    out = generate(model, ids, 6)
    assert out.shape == (1, 26) and torch.equal(out[:, :20], ids)
    with torch.no_grad():
        # each generated token is the argmax of a plain forward over the sequence before it
        for t in range(20, 26):
            assert out[0, t].item() == model(out[:, :t])[0, -1].argmax().item()


def test_decode_without_caches_is_an_error():
    with pytest.raises(RuntimeError, match="setup_caches"):
        tiny_model()(torch.zeros(1, 1, dtype=torch.long), torch.tensor([0]))


def _layer_qk(model, ids, layer):
    from fp_compile.demo.run import capture_sdpa_inputs

    return capture_sdpa_inputs(model, ids, index=layer)


def test_planted_structure_makes_attention_sparse_and_local():
    args = ModelArgs(vocab_size=128, dim=128, n_layers=1, n_heads=4, n_kv_heads=2,
                     intermediate_size=128, max_seq_len=2048)
    ids = torch.randint(1, 128, (1, 2048), generator=torch.Generator().manual_seed(3))
    ids[:, 0] = 0
    cfg = FlashPrefillConfig(block_size=64)
    with torch.no_grad():
        plain = tiny_model(args=args)
        q, k = _layer_qk(plain, ids, 0)
        d_plain = fp_compile.select_blocks(q, k, config=cfg).density
        planted = plant_attention_structure(tiny_model(args=args))
        q, k = _layer_qk(planted, ids, 0)
        d_planted = fp_compile.select_blocks(q, k, config=cfg).density
        # the sink token takes a clear share of the last queries' attention
        p = (q[:, :, -64:] @ k.repeat_interleave(2, 1).transpose(-1, -2) / 32 ** 0.5).softmax(-1)
    print(f"density plain {d_plain:.3f}, planted {d_planted:.3f}, sink mass "
          f"{p[..., 0].mean():.3f}")
    assert d_plain > 0.95           # random weights: near-uniform attention, nothing to skip
    assert d_planted < 0.8 * d_plain
    assert p[..., 0].mean() > 20 / 2048


# Per-layer settings: the pass numbers layers by the model's layer index (layers.<i>); dense_layers
# keeps a layer's SDPA untouched, layer_alpha reaches the op of that layer only.

def test_dense_layers_are_left_dense_with_reason():
    model = tiny_model(args=ModelArgs(**{**TINY.__dict__, "n_layers": 3}))
    ids = torch.randint(0, 128, (1, 64))
    with torch.no_grad():
        report = fp_compile.explain(model, ids, config=FlashPrefillConfig(
            block_size=16, min_seq_len=0, dense_layers=(0, 2)))
    assert [r.layer for r in report.rewritten] == [1], report
    assert [(s.layer, s.reason) for s in report.skipped] == [(0, "dense layer"),
                                                             (2, "dense layer")], report


def test_layer_alpha_reaches_each_layer():
    model = plant_attention_structure(tiny_model(args=ModelArgs(**{**TINY.__dict__,
                                                                   "max_seq_len": 1024})))
    ids = torch.randint(1, 128, (1, 1024), generator=torch.Generator().manual_seed(4))
    ids[:, 0] = 0
    cfg = FlashPrefillConfig(block_size=32, min_seq_len=0, alpha=0.6, layer_alpha={1: 0.0},
                             collect_stats=True)
    fp_compile.reset_stats()
    with torch.no_grad():
        report = fp_compile.explain(model, ids, config=cfg)
    table = fp_compile.stats()
    fp_compile.reset_stats()
    print(table)
    assert len(report.rewritten) == 2
    by_layer = table.by_layer()
    assert sorted(by_layer) == [0, 1]
    assert by_layer[1] == 1.0            # alpha 0 keeps every causal block
    assert by_layer[0] < 0.9             # alpha 0.6 on the planted model drops blocks
    assert all(r.alpha == (0.0 if r.layer == 1 else 0.6) for r in table)
