"""The dispatch layer's guards: dense attention where sparsity does not pay, and the mass guard
fixing what the paper's rule drops, against dense SDPA and the plain-torch reference."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F

import fp_compile
from fp_compile import FlashPrefillConfig, dense_history, dispatch, flash_prefill
from fp_compile.accuracy import rel_l2
from fp_compile.demo.synthetic import planted_qkv
from tests.helpers import assert_close, assert_select_equals_reference, gpu, spy_calls

SMALL = dict(block_size=32, min_seq_len=0, kernel="reference", collect_stats=True)


@pytest.fixture(autouse=True)
def clean_stats():
    fp_compile.reset_stats()
    yield
    fp_compile.reset_stats()


def random_qkv(H=4, Hkv=2, S=512, D=32, sigma=1.0, seed=0):
    """Structure-less attention: q, k ~ N(0, 1) with logits of std ``sigma``."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H, S, D, generator=g) * sigma
    k, v = torch.randn(2, 1, Hkv, S, D, generator=g)
    return q, k, v


@pytest.mark.parametrize("sigma", [1.0, 3.0])
def test_structureless_input_takes_the_dense_path_and_equals_sdpa(sigma):
    q, k, v = random_qkv(sigma=sigma)
    out = flash_prefill(q, k, v, enable_gqa=True, config=FlashPrefillConfig(**SMALL))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.equal(out, want)
    (row,) = fp_compile.stats().rows
    assert row.dense_heads == (True,) * 4 and row.density > 0.6
    # the paper's rule keeps its blocks and computes them block-sparse: close, not identical
    paper = flash_prefill(q, k, v, enable_gqa=True,
                          config=FlashPrefillConfig.paper_rule(**SMALL))
    assert fp_compile.stats().rows[-1].dense_heads == ()
    assert not torch.equal(paper, want)


def test_mixed_groups_run_dense_only_where_density_is_high():
    # kv group 0 structure-less (dense), group 1 strongly structured (sparse)
    qs, ks, vs = planted_qkv(1, 2, 1, 1024, 32, seed=2, strength=2.0)
    qr, kr, vr = random_qkv(H=2, Hkv=1, S=1024, seed=3)
    q, k, v = torch.cat([qr, qs], 1), torch.cat([kr, ks], 1), torch.cat([vr, vs], 1)
    config = FlashPrefillConfig(**SMALL, dense_above=0.9)
    out = flash_prefill(q, k, v, enable_gqa=True, config=config)
    (row,) = fp_compile.stats().rows
    assert row.dense_heads == (True, True, False, False), row
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.equal(out[:, :2], dense[:, :2])
    assert not torch.equal(out[:, 2:], dense[:, 2:])
    assert_close(out, dispatch.reference(q, k, v, None, config), 1e-6, 1e-6)


def test_mass_guard_holds_the_error_where_the_paper_rule_drops_a_diffuse_tail():
    q, k, v = planted_qkv(1, 4, 2, 4096, 32, seed=0, strength=0.75)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    # the guard alone (no dense fallback), at a floor this short prompt needs
    cfg = dict(SMALL, block_size=64)
    paper = flash_prefill(q, k, v, enable_gqa=True,
                          config=FlashPrefillConfig.paper_rule(**cfg))
    guarded = flash_prefill(q, k, v, enable_gqa=True,
                            config=FlashPrefillConfig(**cfg, dense_above=1.0, mass_floor=0.95))
    paper_row, guard_row = fp_compile.stats().rows
    err_paper, err_guard = rel_l2(paper, dense), rel_l2(guarded, dense)
    assert err_guard < 0.5 * err_paper, (err_paper, err_guard)
    assert guard_row.min_mass >= 0.95 - 1e-5
    assert guard_row.density > paper_row.density


def test_stats_table_reports_mass_and_dense_heads():
    q, k, v = random_qkv()
    flash_prefill(q, k, v, enable_gqa=True, config=FlashPrefillConfig(**SMALL))
    text = str(fp_compile.stats())
    assert "min mass" in text and "dense h" in text
    assert "1.00*" in text                      # a head that ran dense is starred
    row = fp_compile.stats().as_dicts()[0]
    assert row["dense_heads"] == [True] * 4 and len(row["head_mass"]) == 4


def test_paper_rule_turns_every_guard_off():
    paper = FlashPrefillConfig.paper_rule()
    assert paper.mass_floor == 0.0 and paper.dense_above == 1.0
    defaults = FlashPrefillConfig()
    assert defaults.mass_floor > 0 and defaults.dense_above < 1


def test_select_blocks_reports_the_kept_mass():
    q, k, _ = planted_qkv(1, 2, 1, 512, 32, seed=1)
    sel = fp_compile.select_blocks(q, k, config=FlashPrefillConfig(block_size=32))
    assert sel.kept_mass.shape == (1, 2, 16)
    assert (sel.kept_mass >= FlashPrefillConfig().mass_floor - 1e-5).all()
    assert math.isclose(float(sel.kept_mass[..., -2:].min()), 1.0)   # dense rows


def test_explain_reports_mass_and_dense_heads_per_layer():
    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    q, k, v = random_qkv()
    with torch.no_grad():
        report = fp_compile.explain(Attention(), q, k, v,
                                    config=FlashPrefillConfig(block_size=32, min_seq_len=0))
    (row,) = report.stats.rows
    assert row.layer == 0 and row.dense_heads == (True,) * 4 and len(row.head_mass) == 4
    assert "min mass" in str(report) and "1.00*" in str(report)


@pytest.mark.parametrize("M", [1, 2, 63, 64, 65, 128, 1000, 8192])
def test_probe_rows_are_evenly_spaced_and_end_at_the_last_block(M):
    start, step, n = dispatch.probe_rows(M)
    assert start + (n - 1) * step == M - 1 and 0 <= start < step
    assert n == M if M < 2 * dispatch.PROBE_ROWS else dispatch.PROBE_ROWS <= n < 2 * dispatch.PROBE_ROWS


# the Triton kernels (interpreter on CPU) through the whole dispatch
TRITON = dict(block_size=32, min_seq_len=0, kernel="triton")


def count_searches(monkeypatch):
    """Record the ``rows`` argument of every Triton pattern search."""
    from fp_compile.kernels import pattern_search as ps

    return spy_calls(monkeypatch, ps, "pattern_search", lambda args, kwargs: kwargs.get("rows"))


def test_a_dense_call_decides_on_the_probe_and_runs_no_block_sparse_attention(monkeypatch):
    monkeypatch.setattr(dispatch, "PROBE_ROWS", 8)      # 64 blocks: 8 probe rows
    q, k, v = random_qkv(S=2048)
    calls = count_searches(monkeypatch)
    from fp_compile.kernels import block_sparse_attention as bsa

    monkeypatch.setattr(bsa, "block_sparse_attention", None)   # would raise if called
    out = flash_prefill(q, k, v, enable_gqa=True, config=FlashPrefillConfig(**TRITON))
    # the probe (blocks 7, 15, ..., 63), then the selection queued ahead of the host's wait
    assert calls == [(7, 8, 8), None], calls
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.equal(out, want)


def test_repeated_dense_calls_queue_cudnn_behind_the_probe(monkeypatch):
    # after DENSE_STREAK all-dense decisions for a key, the call queues the dense attention
    # behind the probe instead of the first selection; the output is the same
    monkeypatch.setattr(dispatch, "PROBE_ROWS", 8)      # 64 blocks: 8 probe rows
    q, k, v = random_qkv(S=2048)
    calls = count_searches(monkeypatch)
    dense_calls = spy_calls(monkeypatch, dispatch, "dense", lambda args, kwargs: args[0].shape[1])
    config = FlashPrefillConfig(**TRITON)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    for _ in range(dense_history.DENSE_STREAK):
        assert torch.equal(flash_prefill(q, k, v, enable_gqa=True, config=config), want)
    assert calls == [(7, 8, 8), None] * dense_history.DENSE_STREAK
    calls.clear()
    from fp_compile.kernels import vertical_slash

    detectors = spy_calls(monkeypatch, vertical_slash, "vertical_slash_flags")
    assert torch.equal(flash_prefill(q, k, v, enable_gqa=True, config=config), want)
    assert calls == [(7, 8, 8)], calls                  # the probe alone: no selection
    assert detectors == []                              # nor the vertical/slash probe
    assert dense_calls == [4] * (dense_history.DENSE_STREAK + 1)
    # another layer, length bucket or head count has its own history
    calls.clear()
    flash_prefill(q[..., :1024, :], k[..., :1024, :], v[..., :1024, :], enable_gqa=True,
                  config=config)
    assert calls == [(3, 4, 8), None], calls


def test_a_wrong_dense_guess_gives_the_output_without_the_guess(monkeypatch):
    # two all-dense calls, then a mixed call of the same key: the dense output computed on the
    # guess serves the dense group, the other group runs block-sparse, as without the guess
    monkeypatch.setattr(dispatch, "PROBE_ROWS", 8)
    qs, ks, vs = planted_qkv(1, 2, 1, 1024, 32, seed=2, strength=2.0)
    qr, kr, vr = random_qkv(H=2, Hkv=1, S=1024, seed=3)
    q, k, v = torch.cat([qr, qs], 1), torch.cat([kr, ks], 1), torch.cat([vr, vs], 1)
    dense_q, dense_k, dense_v = random_qkv(H=4, Hkv=2, S=1024, seed=4)
    config = FlashPrefillConfig(**TRITON, dense_above=0.9)
    for _ in range(dense_history.DENSE_STREAK):
        flash_prefill(dense_q, dense_k, dense_v, enable_gqa=True, config=config)
    dense_calls = spy_calls(monkeypatch, dispatch, "dense", lambda args, kwargs: args[0].shape[1])
    calls = count_searches(monkeypatch)
    out = flash_prefill(q, k, v, enable_gqa=True, config=config)
    # the probe without the vertical/slash blocks (not all dense), again with them, then the
    # whole selection
    assert calls == [(3, 4, 8), (3, 4, 8), None], calls
    assert dense_calls == [4]                           # the guess's, read for group 0
    dense_history.clear()
    again = flash_prefill(q, k, v, enable_gqa=True, config=config)
    assert dense_calls == [4, 2]                        # without the guess: group 0 alone
    assert_close(out, again, 1e-6, 1e-6)
    want = dispatch.reference(q, k, v, None, config.replace(kernel="reference"))
    assert_close(out, want, 2e-5, 2e-5)
    # the mixed decision ended the streak: the next call guesses nothing
    calls.clear()
    flash_prefill(q, k, v, enable_gqa=True, config=config)
    assert calls == [(3, 4, 8), None], calls


def test_no_dense_guess_at_or_above_speculate_below(monkeypatch):
    monkeypatch.setattr(dispatch, "PROBE_ROWS", 8)
    monkeypatch.setattr(dense_history, "SPECULATE_BELOW", 2048)
    q, k, v = random_qkv(S=2048)
    calls = count_searches(monkeypatch)
    for _ in range(dense_history.DENSE_STREAK + 1):
        flash_prefill(q, k, v, enable_gqa=True, config=FlashPrefillConfig(**TRITON))
    assert calls == [(7, 8, 8), None] * (dense_history.DENSE_STREAK + 1)


# (PROBE_ROWS, INDEX_BYTES, the searches expected): 32 blocks, 4 heads
SEARCHES = {
    "whole": (64, 1 << 30, [None]),                   # the probe would read every row: 1 search
    "probe": (8, 1 << 30, [(3, 4, 8), None]),         # probe rows 3, 7, ..., 31, then the rest
    "chunks": (8, 3 * 4 * 4 * 32, [(3, 4, 8)] + [(i, 1, min(3, 32 - i)) for i in range(0, 32, 3)]),
}


@pytest.mark.parametrize("case", SEARCHES)
def test_chunked_selection_equals_the_whole_call_and_the_reference(monkeypatch, case):
    probe_rows, index_bytes, searches = SEARCHES[case]
    monkeypatch.setattr(dispatch, "PROBE_ROWS", probe_rows)
    monkeypatch.setattr(dispatch, "INDEX_BYTES", index_bytes)   # "chunks": 3 blocks a chunk
    # kv group 0 structure-less (dense), group 1 structured (sparse)
    qs, ks, vs = planted_qkv(1, 2, 1, 1024, 32, seed=2, strength=2.0)
    qr, kr, vr = random_qkv(H=2, Hkv=1, S=1024, seed=3)
    q, k, v = torch.cat([qr, qs], 1), torch.cat([kr, ks], 1), torch.cat([vr, vs], 1)
    config = FlashPrefillConfig(**TRITON, dense_above=0.9, collect_stats=True)
    calls = count_searches(monkeypatch)
    out = flash_prefill(q, k, v, enable_gqa=True, config=config)
    assert calls == searches
    (row,) = fp_compile.stats().rows
    assert row.dense_heads == (True, True, False, False), row
    want = dispatch.reference(q, k, v, None, config.replace(kernel="reference"))
    assert_close(out, want, 2e-5, 2e-5)
    assert torch.equal(out[:, :2], F.scaled_dot_product_attention(
        q[:, :2], k[:, :1], v[:, :1], is_causal=True, enable_gqa=True))


@gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_gpu_chunks_equal_the_whole_index(monkeypatch, compiled):
    # 64 blocks of 128, 8 heads: 5 chunks of 14 blocks when INDEX_BYTES holds 14 rows
    q, k, v = planted_qkv(1, 8, 2, 8192, 128, seed=1, dtype=torch.bfloat16, device="cuda")
    configs = [FlashPrefillConfig(min_seq_len=0), FlashPrefillConfig.paper_rule(min_seq_len=0)]
    for config in configs:
        whole = flash_prefill(q, k, v, enable_gqa=True, config=config)
        monkeypatch.setattr(dispatch, "INDEX_BYTES", 14 * 8 * 64 * 4)
        assert dispatch.chunk_rows(1, 8, 64) == 14

        def op(q, k, v):
            return flash_prefill(q, k, v, enable_gqa=True, config=config)

        fn = torch.compile(op, fullgraph=True, dynamic=False) if compiled else op
        poison = torch.full_like(q, float("nan"))
        del poison
        chunked = fn(q, k, v)
        monkeypatch.setattr(dispatch, "INDEX_BYTES", 1 << 40)
        torch._dynamo.reset()
        assert chunked.isfinite().all()
        assert rel_l2(chunked, whole) < 1e-3, (config, rel_l2(chunked, whole))


@settings(max_examples=10, deadline=None)
@given(S=st.integers(65, 700), block=st.sampled_from([16, 32]), groups=st.sampled_from([1, 2]),
       chunk=st.integers(1, 9), probe=st.sampled_from([2, 4, 64]), shared=st.booleans(),
       floor=st.sampled_from([0.0, 0.8]), dense_above=st.sampled_from([0.7, 1.0]),
       seed=st.integers(0, 99))
def test_property_chunks_and_probe_equal_the_reference(S, block, groups, chunk, probe, shared,
                                                        floor, dense_above, seed):
    # any chunking of the query blocks and any probe spacing (kv groups dense, sparse or mixed;
    # dense_above 1: every group sparse): the same output as the reference
    q, k, v = planted_qkv(1, 2 * groups, 2, S, 16, seed=seed, strength=1.0)
    M = -(-S // block)
    config = FlashPrefillConfig(block_size=block, min_seq_len=0, kernel="triton", alpha=0.2,
                                gqa_shared=shared, mass_floor=floor, dense_above=dense_above)
    saved = dispatch.INDEX_BYTES, dispatch.PROBE_ROWS
    dispatch.INDEX_BYTES, dispatch.PROBE_ROWS = chunk * q.shape[1] * M * 4, probe
    try:
        out = dispatch.run(q, k, v, None, config)
    finally:
        dispatch.INDEX_BYTES, dispatch.PROBE_ROWS = saved
    saved_probe = dispatch.PROBE_ROWS
    dispatch.PROBE_ROWS = probe
    try:
        want = dispatch.reference(q, k, v, None, config)
    finally:
        dispatch.PROBE_ROWS = saved_probe
    assert_close(out, want, 3e-5, 3e-5)


@pytest.mark.parametrize("floor", [0.0, 0.8], ids=["paper", "guard"])
@pytest.mark.parametrize("shared", [False, True], ids=["per_head", "shared"])
def test_select_with_vertical_slash_equals_the_reference(shared, floor):
    # the Triton search ORs the detector's flags into each head's row, before the GQA union
    q, k, _ = planted_qkv(1, 4, 2, 384, 32, seed=6)
    config = FlashPrefillConfig(**dict(TRITON, block_size=16), alpha=0.3, sink_blocks=1,
                                window_blocks=1, last_dense_blocks=1, gqa_shared=shared,
                                mass_floor=floor, vertical_slash=True, vs_threshold=0.01)
    scale = 32 ** -0.5
    sel, _ = assert_select_equals_reference(q, k, scale, config)
    plain = dispatch.select(q, k, scale, config.replace(vertical_slash=False))
    assert int(sel.num.sum()) > int(plain.num.sum()), "the detector should add blocks here"


@pytest.mark.parametrize("rows", [8, 32])
def test_select_with_a_last_rows_probe_equals_the_reference(rows):
    # vs_rows: the probe on the prompt's last rows (fewer than a block, or two blocks' worth)
    q, k, _ = planted_qkv(1, 4, 2, 384, 32, seed=7)
    config = FlashPrefillConfig(**dict(TRITON, block_size=16), alpha=0.3, sink_blocks=1,
                                window_blocks=1, last_dense_blocks=1, mass_floor=0.8,
                                vertical_slash=True, vs_threshold=0.01, vs_rows=rows)
    scale = 32 ** -0.5
    sel, _ = assert_select_equals_reference(q, k, scale, config)
    block = dispatch.select(q, k, scale, config.replace(vs_rows=0))
    assert not torch.equal(sel.num, block.num), "the probe's rows should change the selection"


def count_detector_calls(monkeypatch):
    """Count the calls of the vertical/slash detector (``vertical_slash_flags``)."""
    from fp_compile.kernels import vertical_slash as vsm

    return spy_calls(monkeypatch, vsm, "vertical_slash_flags")


@pytest.mark.parametrize("shared", [False, True], ids=["per_head", "shared"])
@pytest.mark.parametrize("case", SEARCHES)
def test_vertical_slash_chunks_and_probe_equal_the_reference(monkeypatch, case, shared):
    # the detector's flags, computed once per call, go into the probe and every chunk's search
    probe_rows, index_bytes, searches = SEARCHES[case]
    monkeypatch.setattr(dispatch, "PROBE_ROWS", probe_rows)
    monkeypatch.setattr(dispatch, "INDEX_BYTES", index_bytes)
    qs, ks, vs = planted_qkv(1, 2, 1, 1024, 32, seed=2, strength=2.0)
    qr, kr, vr = random_qkv(H=2, Hkv=1, S=1024, seed=3)
    q, k, v = torch.cat([qr, qs], 1), torch.cat([kr, ks], 1), torch.cat([vr, vs], 1)
    config = FlashPrefillConfig(**TRITON, dense_above=0.9, collect_stats=True, gqa_shared=shared,
                                vertical_slash=True, vs_threshold=0.002)
    calls, detector = count_searches(monkeypatch), count_detector_calls(monkeypatch)
    out = flash_prefill(q, k, v, enable_gqa=True, config=config)
    assert calls == searches and len(detector) == 1
    (row,) = fp_compile.stats().rows
    assert row.dense_heads == (True, True, False, False), row
    reference = config.replace(kernel="reference")
    assert_close(out, dispatch.reference(q, k, v, None, reference), 2e-5, 2e-5)
    # the sparse group's blocks with the detector: more than without, as the reference's
    keep = dispatch.select_mask(q, k, 32 ** -0.5, reference)
    plain = dispatch.select_mask(q, k, 32 ** -0.5, reference.replace(vertical_slash=False))
    assert keep[:, 2:].sum() > plain[:, 2:].sum(), "the detector should add blocks here"


@settings(max_examples=8, deadline=None)
@given(S=st.integers(65, 600), block=st.sampled_from([16, 32]), groups=st.sampled_from([1, 2]),
       chunk=st.integers(1, 9), probe=st.sampled_from([2, 4, 64]), shared=st.booleans(),
       floor=st.sampled_from([0.0, 0.8]), dense_above=st.sampled_from([0.7, 1.0]),
       seed=st.integers(0, 99))
def test_property_vertical_slash_chunks_equal_the_reference(S, block, groups, chunk, probe,
                                                             shared, floor, dense_above, seed):
    q, k, v = planted_qkv(1, 2 * groups, 2, S, 16, seed=seed, strength=1.0)
    M = -(-S // block)
    config = FlashPrefillConfig(block_size=block, min_seq_len=0, kernel="triton", alpha=0.2,
                                gqa_shared=shared, mass_floor=floor, dense_above=dense_above,
                                vertical_slash=True, vs_threshold=0.01)
    saved = dispatch.INDEX_BYTES, dispatch.PROBE_ROWS
    dispatch.INDEX_BYTES, dispatch.PROBE_ROWS = chunk * q.shape[1] * M * 4, probe
    try:
        out = dispatch.run(q, k, v, None, config)
        want = dispatch.reference(q, k, v, None, config)
    finally:
        dispatch.INDEX_BYTES, dispatch.PROBE_ROWS = saved
    assert_close(out, want, 3e-5, 3e-5)


def test_eager_16bit_calls_with_blocks_of_128_take_the_tma_attention(monkeypatch):
    # dispatch.ATTENTION_VARIANT serves eager fp16/bf16 launches with blocks of 128 (run 45);
    # its output is the reference's
    from fp_compile.kernels import block_sparse_attention_tma as bt

    q, k, v = planted_qkv(1, 4, 2, 512, 32, seed=0, dtype=torch.float16)
    config = FlashPrefillConfig(block_size=128, min_seq_len=0, kernel="triton", alpha=0.3,
                                dense_above=1.0)
    variants = spy_calls(monkeypatch, bt, "block_sparse_attention_variant",
                         lambda args, kwargs: kwargs["variant"])
    out = dispatch.run(q, k, v, None, config)
    assert variants == [dispatch.ATTENTION_VARIANT] == ["tma_fold"]
    want = dispatch.reference(q.float(), k.float(), v.float(), None,
                              config.replace(kernel="reference"))
    assert rel_l2(out.float(), want) < 2e-3


def test_repeated_sparse_calls_queue_the_attention_before_the_decision(monkeypatch):
    # after SPARSE_STREAK decisions with no dense group for a key, the call skips the probe:
    # the whole selection, then the attention, queued before the flags are read; same output
    monkeypatch.setattr(dispatch, "PROBE_ROWS", 8)
    q, k, v = planted_qkv(1, 4, 2, 1024, 32, seed=2, strength=2.0)
    config = FlashPrefillConfig(**TRITON, dense_above=0.9)
    calls = count_searches(monkeypatch)
    outs = [flash_prefill(q, k, v, enable_gqa=True, config=config)
            for _ in range(dense_history.SPARSE_STREAK)]
    assert calls == [(3, 4, 8), None] * dense_history.SPARSE_STREAK, calls
    calls.clear()
    order = spy_calls(monkeypatch, dispatch, "sparse", lambda args, kwargs: len(calls))
    out = flash_prefill(q, k, v, enable_gqa=True, config=config)
    assert calls == [None], calls                       # no probe: the whole selection alone
    assert order == [1]                                 # the attention, after that selection
    assert torch.equal(out, outs[0])
    want = dispatch.reference(q, k, v, None, config.replace(kernel="reference"))
    assert_close(out, want, 2e-5, 2e-5)


@pytest.mark.parametrize("dense_q", ["all", "one group"])
def test_a_wrong_sparse_guess_gives_the_output_without_the_guess(monkeypatch, dense_q):
    # two sparse calls, then a call of the same key whose groups run dense (all, or group 0):
    # the speculative attention is overwritten where the flags say dense
    monkeypatch.setattr(dispatch, "PROBE_ROWS", 8)
    qs, ks, vs = planted_qkv(1, 4, 2, 1024, 32, seed=2, strength=2.0)
    config = FlashPrefillConfig(**TRITON, dense_above=0.9)
    for _ in range(dense_history.SPARSE_STREAK):
        flash_prefill(qs, ks, vs, enable_gqa=True, config=config)
    qr, kr, vr = random_qkv(H=4, Hkv=2, S=1024, seed=3)
    if dense_q == "all":
        q, k, v = qr, kr, vr
    else:   # group 0 structure-less, group 1 planted
        q = torch.cat([qr[:, :2], qs[:, 2:]], 1)
        k, v = torch.cat([kr[:, :1], ks[:, 1:]], 1), torch.cat([vr[:, :1], vs[:, 1:]], 1)
    dense_calls = spy_calls(monkeypatch, dispatch, "dense", lambda args, kwargs: args[0].shape[1])
    attn = spy_calls(monkeypatch, dispatch, "sparse", lambda args, kwargs: args[0].shape[1])
    out = flash_prefill(q, k, v, enable_gqa=True, config=config)
    assert attn == [4], "the guess attends every head before the decision is read"
    assert dense_calls == ([4] if dense_q == "all" else [2])
    dense_history.clear()
    again = flash_prefill(q, k, v, enable_gqa=True, config=config)
    assert_close(out, again, 1e-6, 1e-6)
    want = dispatch.reference(q, k, v, None, config.replace(kernel="reference"))
    assert_close(out, want, 2e-5, 2e-5)
    if dense_q == "all":
        assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                               enable_gqa=True))
