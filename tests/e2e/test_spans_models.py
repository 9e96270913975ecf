"""Calls with a span end to end (issue 11): Hugging Face padded batches through generate(),
continuations over a DynamicCache, chunked prefill, and gpt-fast's own attention (static KV
cache written at input_pos, mask rows of a causal buffer, GQA by repeat_interleave). Every layer's
prefill is rewritten; at alpha 0 the results equal eager."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

transformers = pytest.importorskip("transformers")

import fp_compile  # noqa: E402
from fp_compile import FlashPrefillConfig  # noqa: E402
from fp_compile.backend import last_report  # noqa: E402
from fp_compile.demo.models import (ModelArgs, build_hf_llama,  # noqa: E402
                                    plant_attention_structure)
from tests.helpers import assert_close  # noqa: E402

ARGS = ModelArgs(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                 intermediate_size=128, max_seq_len=2048)
# alpha 0 keeps every block a row can see: the op equals dense attention up to rounding
EXACT = {"alpha": 0.0, "block_size": 64, "min_seq_len": 0}
SPARSE = {"block_size": 64, "min_seq_len": 0}        # the defaults, from 0 tokens on
# the paper's rule (guards off) at its default alpha: on this small model it drops blocks
PAPER = {f.name: getattr(FlashPrefillConfig.paper_rule(), f.name)
         for f in __import__("dataclasses").fields(FlashPrefillConfig)
         if f.name in ("alpha", "mass_floor", "dense_above")} | {"block_size": 32,
                                                                   "min_seq_len": 0}

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("fresh_dynamo")]


def tiny(family="llama", seed=0):
    torch.manual_seed(seed)
    return build_hf_llama(ARGS, family)


def prompt(batch, length, seed=1):
    return torch.randint(1, ARGS.vocab_size, (batch, length),
                         generator=torch.Generator().manual_seed(seed))


PAD = ARGS.vocab_size - 1


def padded_batch(lengths, side):
    """Prompts of different lengths padded to the longest, as a tokenizer pads them; each
    starts with token 0 (the sink ``plant_attention_structure`` plants)."""
    S = max(lengths)
    ids = torch.full((len(lengths), S), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    rows = [prompt(1, n, seed=10 + i)[0].clamp(1, PAD - 1) for i, n in enumerate(lengths)]
    for row in rows:
        row[0] = 0
    for b, row in enumerate(rows):
        cols = slice(S - len(row), S) if side == "left" else slice(0, len(row))
        ids[b, cols] = row
        mask[b, cols] = 1
    return ids, mask, rows


def compiled_forward(model, options):
    model.forward = torch.compile(model.forward, backend="flashprefill", options=options)
    return model


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_generate_equals_eager_at_alpha_0(side):
    model = tiny("llama")
    ids, mask, _ = padded_batch([900, 550], side)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                              pad_token_id=PAD)
        compiled_forward(model, EXACT)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                             pad_token_id=PAD)
    assert torch.equal(got, want), (got[:, -3:], want[:, -3:])
    report = last_report()          # the prefill graph and the decode graphs, merged
    prefill = [r for r in report.rewritten if r.q_shape[2] != 1]
    assert len(prefill) == ARGS.n_layers and {r.form for r in prefill} == {"padded"}, report
    assert all(s.reason == "decode (q_len 1)" for s in report.skipped), report


def _prefill_logits(model, ids, mask, options=None):
    torch._dynamo.reset()
    fn = model if options is None else torch.compile(model, backend="flashprefill",
                                                      options=options)
    with torch.no_grad():
        return fn(ids, attention_mask=mask).logits


@pytest.mark.parametrize("rule", ["defaults", "paper_rule"])
def test_padded_batch_error_within_the_single_prompt_error(rule):
    """At the default rule each padded row's prefill is as close to dense as the same prompt
    run alone (figures printed; -s shows them), on a model with planted attention structure
    (random weights attend uniformly: nothing would be dropped)."""
    model = plant_attention_structure(tiny("llama"))
    options = SPARSE if rule == "defaults" else PAPER
    ids, mask, rows = padded_batch([900, 550], "left")
    dense = _prefill_logits(model, ids, mask)
    sparse = _prefill_logits(model, ids, mask, options)
    report = last_report()
    assert len(report.rewritten) == ARGS.n_layers and {r.form for r in report.rewritten} == {
        "padded"}, report
    for b, row in enumerate(rows):
        n = len(row)
        alone_dense = _prefill_logits(model, row[None], None)
        alone_sparse = _prefill_logits(model, row[None], None, options)
        single = (alone_sparse - alone_dense).norm() / alone_dense.norm()
        batched = (sparse[b, -n:] - dense[b, -n:]).norm() / dense[b, -n:].norm()
        print(f"{rule}, prompt {b} ({n} tokens): relative error of the logits batched "
              f"{batched:.4f}, alone {single:.4f}")
        if rule == "paper_rule":
            assert single > 1e-4, "the rule dropped nothing: the test would prove nothing"
        assert batched <= 1.5 * single + 2e-3, (b, float(batched), float(single))


def test_continuation_over_a_cache_is_rewritten_and_exact():
    from transformers import DynamicCache

    model = tiny("qwen2")
    ids = prompt(1, 1200)
    with torch.no_grad():
        cache = DynamicCache()
        model(ids[:, :700], past_key_values=cache, use_cache=True)
        want = model(ids[:, 700:], past_key_values=cache, use_cache=True).logits
        cache = DynamicCache()
        model(ids[:, :700], past_key_values=cache, use_cache=True)
        compiled = torch.compile(model, backend="flashprefill", options=EXACT)
        got = compiled(ids[:, 700:], past_key_values=cache, use_cache=True).logits
    report = last_report()
    assert len(report.rewritten) == ARGS.n_layers, report
    assert {r.form for r in report.rewritten} == {"offset"}, report
    assert_close(got, want, 1e-4, 1e-4, "logits")


def test_chunked_prefill_equals_one_call():
    from transformers import DynamicCache

    model = tiny("mistral")
    ids = prompt(1, 2000)
    with torch.no_grad():
        want = model(ids).logits
        compiled = torch.compile(model, backend="flashprefill", options=EXACT)
        cache = DynamicCache()
        got = torch.cat([compiled(ids[:, c:c + 500], past_key_values=cache,
                                  use_cache=True).logits for c in range(0, 2000, 500)], dim=1)
    assert counters["flashprefill"]["sdpa_rewritten"] >= ARGS.n_layers
    assert_close(got, want, 1e-4, 1e-4, "logits")


# --------------------------------------------------------------------------- gpt-fast's attention

class KVCache(nn.Module):
    """gpt-fast's static cache: written at input_pos, read whole."""

    def __init__(self, batch, n_kv_heads, max_len, head_dim):
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(batch, n_kv_heads, max_len, head_dim))
        self.register_buffer("v_cache", torch.zeros(batch, n_kv_heads, max_len, head_dim))

    def update(self, input_pos, k, v):
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        return self.k_cache, self.v_cache


class GptFastAttention(nn.Module):
    """gpt-fast's Attention.forward, with its mask ``causal_mask[None, None, input_pos]``."""

    def __init__(self, dim=64, n_head=4, n_local_heads=2, max_len=1536):
        super().__init__()
        self.n_head, self.n_local_heads, self.head_dim = n_head, n_local_heads, dim // n_head
        self.wqkv = nn.Linear(dim, (n_head + 2 * n_local_heads) * self.head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.kv_cache = KVCache(1, n_local_heads, max_len, self.head_dim)
        self.register_buffer("causal_mask",
                             torch.tril(torch.ones(max_len, max_len, dtype=torch.bool)))

    def forward(self, x, input_pos):
        B, T, _ = x.shape
        kv = self.n_local_heads * self.head_dim
        q, k, v = self.wqkv(x).split([self.n_head * self.head_dim, kv, kv], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_local_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_local_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_cache.update(input_pos, k, v)
        mask = self.causal_mask[None, None, input_pos]
        k = k.repeat_interleave(self.n_head // self.n_local_heads, dim=1)
        v = v.repeat_interleave(self.n_head // self.n_local_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0)
        return self.wo(y.transpose(1, 2).contiguous().view(B, T, -1))


def test_gpt_fast_attention_prefill_and_second_chunk():
    torch.manual_seed(0)
    eager, model = GptFastAttention().eval(), GptFastAttention().eval()
    model.load_state_dict(eager.state_dict())
    x = torch.randn(1, 1100, 64)
    compiled = torch.compile(model, backend="flashprefill", options=EXACT)
    with torch.no_grad():
        for lo, hi in ((0, 700), (700, 1100)):
            pos = torch.arange(lo, hi)
            want = eager(x[:, lo:hi], pos)
            got = compiled(x[:, lo:hi], pos)
            assert_close(got, want, 1e-4, 1e-4, f"positions {lo}..{hi - 1}")
    report = last_report()
    assert report.rewritten and not report.skipped, report
    assert {r.form for r in report.rewritten} == {"cache buffer"}, report
    assert all("repeat_interleave" in r.folded for r in report.rewritten), report
