"""One compiled graph for every prompt length: with dynamic shapes the backend runs once, and the
op decides dense (short prompt) or sparse (long prompt) at run time, without a length guard."""

import dataclasses

import torch
import torch.nn.functional as F

import fp_compile
from fp_compile import FlashPrefillConfig
from fp_compile.demo.models import ModelArgs, Transformer, plant_attention_structure
from tests.helpers import assert_close


class FlashPrefillMode(torch.overrides.TorchFunctionMode):
    """Eager expectation: causal, unmasked SDPA calls go to fp_compile.flash_prefill with the
    config of their layer (numbered by call order), the others run as written."""

    def __init__(self, config):
        super().__init__()
        self.config, self.layer = config, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            layer_cfg = self.config.for_layer(self.layer)
            self.layer += 1
            if kwargs.get("is_causal") and kwargs.get("attn_mask") is None and layer_cfg:
                return fp_compile.flash_prefill(*args[:3], scale=kwargs.get("scale"),
                                                enable_gqa=kwargs.get("enable_gqa", False),
                                                config=layer_cfg)
        return func(*args, **kwargs)


def counting_backend(config):
    from fp_compile.backend import flashprefill_backend

    calls = []
    options = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}

    def backend(gm, example_inputs):
        # Counted on return: with dynamic=True dynamo may restart its first analysis from inside
        # the backend (python-float specialization), which installs nothing.
        compiled = flashprefill_backend(gm, example_inputs, options=options)
        calls.append(gm)
        return compiled

    return backend, calls


def test_one_graph_serves_short_dense_and_long_sparse_prompts():
    torch._dynamo.reset()
    args = ModelArgs(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                     intermediate_size=128, max_seq_len=512)
    torch.manual_seed(0)
    model = plant_attention_structure(Transformer(args).eval())
    cfg = FlashPrefillConfig.paper_rule(block_size=16, min_seq_len=96, alpha=0.5,
                                        collect_stats=True)
    backend, calls = counting_backend(cfg)
    compiled = torch.compile(model.hidden, backend=backend, dynamic=True)
    fp_compile.reset_stats()
    gen = torch.Generator().manual_seed(1)
    lengths = (40, 77, 150, 333)                  # two below min_seq_len, two above
    try:
        with torch.no_grad():
            for S in lengths:
                ids = torch.randint(1, 128, (1, S), generator=gen)
                ids[:, 0] = 0
                got = compiled(ids)
                with FlashPrefillMode(cfg.replace(collect_stats=False)):
                    want = model.hidden(ids)
                dense = model.hidden(ids)
                assert_close(got, want, 2e-4, 2e-4, f"S={S} vs eager flash_prefill")
                if S > 96:
                    # sparse for real: the output is not dense attention's
                    assert (got - dense).abs().max() > 1e-3, S
        table = fp_compile.stats()
    finally:
        fp_compile.reset_stats()
        torch._dynamo.reset()
    print(table)
    assert len(calls) == 1, f"backend compiled {len(calls)} graphs for {len(lengths)} lengths"
    modes = {(r.seq_len, r.sparse) for r in table}
    assert modes == {(40, False), (77, False), (150, True), (333, True)}
    assert min(r.density for r in table if r.sparse) < 1.0


def test_mark_dynamic_sequence_dim_no_recompile():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(2)
    wq, wk, wv = (torch.randn(32, n * 16, generator=gen) / 6 for n in (4, 2, 2))

    def attn(x):
        # q, k, v from the same tokens, as in a model: their sequence dims share one symbol
        B, S, _ = x.shape
        q = (x @ wq).view(B, S, 4, 16).transpose(1, 2)
        k = (x @ wk).view(B, S, 2, 16).transpose(1, 2)
        v = (x @ wv).view(B, S, 2, 16).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True) * 2.0

    cfg = FlashPrefillConfig(block_size=16, min_seq_len=64, alpha=0.0)
    backend, calls = counting_backend(cfg)
    compiled = torch.compile(attn, backend=backend)
    try:
        for S in (33, 64, 130):
            x = torch.randn(1, S, 32, generator=gen)
            torch._dynamo.mark_dynamic(x, 1)
            # alpha 0 keeps every causal block: sparse and dense paths both equal SDPA
            assert_close(compiled(x), attn(x), 1e-5, 1e-5, f"S={S}")
        assert len(calls) == 1, f"{len(calls)} compiles for 3 lengths"
        (gm,) = calls
        targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
        assert any("flash_prefill" in t for t in targets), targets
        assert not any("scaled_dot_product" in t for t in targets), targets
    finally:
        torch._dynamo.reset()
