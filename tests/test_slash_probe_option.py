"""The slash_probe option through the config, the op and the dispatch: off by default and under
the paper's rule, old programs (no slash_probe argument) unchanged, the Triton selection (probe,
chunks) equal to the reference's, refused with a span, and the op's error on a planted slash
input no worse with it than without."""

import pytest
import torch
import torch.nn.functional as F

import fp_compile
from fp_compile import FlashPrefillConfig, dispatch
from fp_compile.accuracy import rel_l2
from fp_compile.demo.synthetic import planted_qkv
from fp_compile.kernels import slash_probe as sp
from fp_compile.kernels import utils as ku
from fp_compile.kernels.search_reference import select_mask_reference
from fp_compile.kernels.vertical_slash import add_vertical_slash
from fp_compile.ops import OP_CONFIG_FIELDS, op_config_args
from tests.helpers import assert_select_equals_reference, spy_calls

TRITON = dict(block_size=32, min_seq_len=0, kernel="triton")


def test_off_by_default_and_in_the_paper_rule():
    assert FlashPrefillConfig().slash_probe == 0.0
    assert FlashPrefillConfig.paper_rule().slash_probe == 0.0
    assert FlashPrefillConfig.paper_rule(alpha=0.2) == FlashPrefillConfig.paper_rule(
        alpha=0.2, slash_probe=0.0)
    at = OP_CONFIG_FIELDS.index("slash_probe")     # the schema's order is fixed
    assert OP_CONFIG_FIELDS[at - 1:at + 2] == ("fp8_attention", "slash_probe", "vs_rows")
    cfg = FlashPrefillConfig.from_options({"slash_probe": 6})
    assert cfg.slash_probe == 6.0 and isinstance(cfg.slash_probe, float)


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), "6", True, None])
def test_invalid_values_raise_naming_the_field(value):
    with pytest.raises(ValueError, match=r"FlashPrefillConfig\.slash_probe"):
        FlashPrefillConfig(slash_probe=value)


def test_programs_without_the_argument_run_as_before():
    # a program saved before the field existed passes every earlier field and the layer only
    q, k, v = planted_qkv(1, 2, 1, 256, 32, seed=0)
    cfg = FlashPrefillConfig(block_size=32, min_seq_len=0, kernel="reference")
    before = op_config_args(cfg)[:OP_CONFIG_FIELDS.index("slash_probe")]
    old = torch.ops.fp_compile.flash_prefill(q, k, v, None, *before)
    assert torch.equal(old, fp_compile.flash_prefill(q, k, v, enable_gqa=True, config=cfg))


@pytest.mark.parametrize("shared,floor,vs", [
    (False, 0.0, False), (False, 0.8, False), (True, 0.0, False), (True, 0.8, False),
    (False, 0.8, True), (True, 0.0, True),
], ids=["per_head", "per_head-guard", "shared", "shared-guard", "per_head-guard-vs",
        "shared-vs"])
def test_select_equals_the_reference(shared, floor, vs):
    q, k, _ = planted_qkv(1, 4, 2, 512, 32, seed=6, strength=2.0)
    config = FlashPrefillConfig(**dict(TRITON, block_size=16), alpha=0.3, sink_blocks=1,
                                window_blocks=1, last_dense_blocks=1, gqa_shared=shared,
                                mass_floor=floor, vertical_slash=vs, vs_threshold=0.01,
                                slash_probe=4.0)
    scale = 32 ** -0.5
    sel, keep = assert_select_equals_reference(q, k, scale, config)
    without = dispatch.select(q, k, scale, config.replace(slash_probe=0.0))
    assert int(sel.num.sum()) > int(without.num.sum()), "the probe should add blocks here"
    # the reference adds exactly the probe's diagonals (with vertical_slash's, an OR)
    flags = sp.slash_probe_flags(q, k, scale, 16, 4.0)
    plain = select_mask_reference(q, k, scale, 16, 0.3, 1, 1, 1, shared, vs, 0.01, floor)
    want = add_vertical_slash(
        select_mask_reference(q, k, scale, 16, 0.3, 1, 1, 1, False, vs, 0.01, floor), *flags)
    if shared:
        want = ku.gqa_union(want, 2)
    assert torch.equal(keep, want) and (keep >= plain).all()


@pytest.mark.parametrize("case", ["whole", "probe", "chunks"])
def test_op_with_probe_and_chunks_equals_the_reference(monkeypatch, case):
    # the flags, computed once per call, go into the dense decision's probe and every chunk
    probe_rows, index_bytes = {"whole": (64, 1 << 30), "probe": (8, 1 << 30),
                               "chunks": (8, 3 * 4 * 4 * 32)}[case]
    monkeypatch.setattr(dispatch, "PROBE_ROWS", probe_rows)
    monkeypatch.setattr(dispatch, "INDEX_BYTES", index_bytes)
    q, k, v = planted_qkv(1, 4, 2, 1024, 32, seed=2, strength=2.0)
    config = FlashPrefillConfig(**TRITON, dense_above=0.9, slash_probe=4.0)
    calls = spy_calls(monkeypatch, sp, "slash_probe_flags")
    out = fp_compile.flash_prefill(q, k, v, enable_gqa=True, config=config)
    assert len(calls) == 1
    reference = config.replace(kernel="reference")
    torch.testing.assert_close(out, dispatch.reference(q, k, v, None, reference), atol=2e-5,
                               rtol=2e-5)
    keep = dispatch.select_mask(q, k, 32 ** -0.5, reference)
    plain = dispatch.select_mask(q, k, 32 ** -0.5, reference.replace(slash_probe=0.0))
    assert keep.sum() > plain.sum(), "the probe should add blocks here"


def test_refused_with_a_span():
    q, k, v = planted_qkv(1, 2, 1, 128, 32, seed=0)
    cfg = FlashPrefillConfig(block_size=32, min_seq_len=0, slash_probe=6.0)
    with pytest.raises(ValueError, match="slash_probe=6.0 is not supported for padded"):
        fp_compile.flash_prefill(q[:, :, 32:], k, v, enable_gqa=True, config=cfg)
    span = ku.Span(torch.tensor(0), torch.zeros(1, dtype=torch.int32),
                   torch.full((1,), 128, dtype=torch.int32))
    with pytest.raises(ValueError, match="slash_probe is not supported with a span"):
        select_mask_reference(q, k, 0.25, 32, 0.3, 1, 1, 1, span=span, slash_probe=6.0)


@pytest.mark.parametrize("strength", [1.0, 2.0])
def test_op_error_with_the_probe_at_most_without(strength):
    # a planted input with a slash head (head 2 of 4) that the defaults without the
    # vertical/slash detector miss (with it they find this one), on the CPU (reference kernels)
    q, k, v = planted_qkv(1, 4, 2, 2048, 64, seed=0, strength=strength)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    cfg = FlashPrefillConfig(block_size=64, min_seq_len=0, kernel="reference",
                             vertical_slash=False)
    without = rel_l2(fp_compile.flash_prefill(q, k, v, enable_gqa=True, config=cfg), dense)
    with_probe = rel_l2(fp_compile.flash_prefill(
        q, k, v, enable_gqa=True, config=cfg.replace(slash_probe=6.0)), dense)
    assert with_probe < 0.75 * without, (with_probe, without)
