"""Hugging Face models (random-init tiny configs, nothing downloaded) under the flashprefill
backend: every layer's prefill attention rewritten, decode steps untouched, greedy generate()
unchanged at alpha=0, padded batches left dense with the reason recorded; the same when
transformers builds the causal mask into the graph instead of passing is_causal=True."""

import pytest
import torch
from torch._dynamo.utils import counters

transformers = pytest.importorskip("transformers")

import fp_compile  # noqa: E402
from fp_compile import FlashPrefillConfig  # noqa: E402
from fp_compile.backend import last_report  # noqa: E402
from fp_compile.demo.models import ModelArgs, build_hf_llama  # noqa: E402
from tests.helpers import assert_close  # noqa: E402

TINY = ModelArgs(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                 intermediate_size=128, max_seq_len=512)
# alpha 0 keeps every causal block, so the op equals dense attention up to rounding
EXACT = {"alpha": 0.0, "block_size": 16, "min_seq_len": 0}


def tiny(family, seed=0):
    torch.manual_seed(seed)
    return build_hf_llama(TINY, family)


def prompt(batch, length, seed=1):
    return torch.randint(1, TINY.vocab_size, (batch, length),
                         generator=torch.Generator().manual_seed(seed))


pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("fresh_dynamo")]


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_every_layer_rewritten_in_prefill(family):
    model = tiny(family)
    with torch.no_grad():
        report = fp_compile.explain(model, prompt(1, 100), config=FlashPrefillConfig(**EXACT))
    # numbered by the model's layer index (model.layers.<i>.self_attn)
    assert [r.layer for r in report.rewritten] == list(range(TINY.n_layers)), report
    assert not report.skipped, report


def test_padded_batch_is_rewritten_as_padded():
    model = tiny("llama")
    ids = prompt(2, 48)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0                                    # left padding on the second row
    with torch.no_grad():
        report = fp_compile.explain(model, ids, attention_mask=mask,
                                    config=FlashPrefillConfig(**EXACT))
    assert [(r.layer, r.form) for r in report.rewritten] == [
        (layer, "padded") for layer in range(TINY.n_layers)], report
    assert not report.skipped, report


def test_compiled_module_matches_eager_logits():
    model = tiny("qwen2")
    ids = prompt(1, 150)
    with torch.no_grad():
        want = model(ids).logits
        got = torch.compile(model, backend="flashprefill", options=EXACT)(ids).logits
    assert counters["flashprefill"]["sdpa_rewritten"] == TINY.n_layers
    assert_close(got, want, 1e-4, 1e-4, "logits")


def test_generate_with_compiled_forward_gives_eager_tokens():
    model = tiny("llama")
    ids = prompt(1, 80)
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=5, do_sample=False)
        model.forward = torch.compile(model.forward, backend="flashprefill", options=EXACT)
        got = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, want), (got, want)
    # one prefill graph with every layer rewritten; the decode graphs (q_len 1) stay dense
    assert counters["flashprefill"]["sdpa_rewritten"] == TINY.n_layers
    skipped = counters["flashprefill"]["sdpa_skipped"]
    assert skipped >= TINY.n_layers and skipped % TINY.n_layers == 0, skipped


@pytest.fixture
def causal_mask_in_graph(monkeypatch):
    """Make transformers build the causal mask while dynamo traces, as it does on torch < 2.14
    (and transformers <= 5.17 on any torch): SDPA then gets a boolean attn_mask made of aranges
    and comparisons, with is_causal=False."""
    from transformers import masking_utils

    if not hasattr(masking_utils, "_ignore_causal_mask_sdpa"):
        pytest.skip("this transformers has no _ignore_causal_mask_sdpa")
    monkeypatch.setattr(masking_utils, "_ignore_causal_mask_sdpa", lambda *args, **kwargs: False)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_causal_mask_in_graph_is_folded(family, causal_mask_in_graph):
    model = tiny(family)
    ids = prompt(1, 100)
    with torch.no_grad():
        report = fp_compile.explain(model, ids, config=FlashPrefillConfig(**EXACT))
        assert len(report.rewritten) == TINY.n_layers and not report.skipped, report
        assert all("causal attn_mask" in r.folded for r in report.rewritten), report
        torch._dynamo.reset()
        counters.clear()
        got = torch.compile(model, backend="flashprefill", options=EXACT)(ids).logits
        want = model(ids).logits
    assert counters["flashprefill"]["sdpa_rewritten"] == TINY.n_layers
    assert_close(got, want, 1e-4, 1e-4, "logits")


def test_causal_mask_in_graph_dynamic_lengths_one_graph(causal_mask_in_graph):
    model = tiny("llama")
    compiled = torch.compile(model, backend="flashprefill", options=EXACT, dynamic=True)
    with torch.no_grad():
        for length in (100, 57, 130):
            ids = prompt(1, length)
            assert_close(compiled(ids).logits, model(ids).logits, 1e-4, 1e-4, f"S={length}")
    report = last_report()
    assert len(report.rewritten) == TINY.n_layers and not report.skipped, report
    length = report.rewritten[0].q_shape[2]
    assert isinstance(length, str) and length.startswith("s"), "the length must stay symbolic"
    assert counters["stats"]["unique_graphs"] == 1


def test_padded_batch_with_causal_mask_in_graph_is_rewritten(causal_mask_in_graph):
    model = tiny("llama")
    ids = prompt(2, 48)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    with torch.no_grad():
        report = fp_compile.explain(model, ids, attention_mask=mask,
                                    config=FlashPrefillConfig(**EXACT))
    assert [r.form for r in report.rewritten] == ["padded"] * TINY.n_layers, report
