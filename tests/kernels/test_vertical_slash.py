"""The vertical/slash probe's Triton kernel against its plain-torch reference.

On CPU the kernel runs in Triton's interpreter (fp16/fp32, small shapes); on a GPU in bf16 at a
long length. The scores must match the reference and the block flags derived from them must be
the reference's flags.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fp_compile.demo.synthetic import planted_qkv
from fp_compile.kernels.vertical_slash import (VARIANTS, flags_from_scores, vertical_slash_flags,
                                               vertical_slash_flags_reference,
                                               vertical_slash_scores,
                                               vertical_slash_scores_reference)
from tests.helpers import DEVICE, assert_close, gpu


def scores_match(q, k, bs, atol=2e-6, variant=None, n_rows=None):
    scale = 1 / math.sqrt(q.shape[-1])
    col, diag = vertical_slash_scores(q, k, scale, bs, variant=variant, n_rows=n_rows)
    ref_col, ref_diag = vertical_slash_scores_reference(q, k, scale, bs, n_rows)
    assert col.shape == ref_col.shape and diag.shape == ref_diag.shape
    assert torch.isfinite(col).all() and torch.isfinite(diag).all()
    assert_close(col, ref_col, atol, 1e-4, "column scores")
    assert_close(diag, ref_diag, atol, 1e-4, "diagonal scores")
    return col, diag, ref_col, ref_diag


# S, bs: the last query block holds R = S - (M - 1) * bs probe rows: 8, 16, 58, 44, 128, 1, 1
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("B,H,Hkv,S,D,bs,dtype", [
    (1, 4, 2, 200, 32, 32, torch.float32),
    (2, 3, 1, 96, 16, 16, torch.float32),
    (1, 2, 2, 250, 64, 64, torch.float16),
    (1, 4, 1, 300, 32, 128, torch.float32),
    (1, 2, 1, 256, 32, 128, torch.float32),
    (1, 2, 2, 129, 32, 64, torch.float32),
    (1, 4, 2, 257, 32, 128, torch.float16),
])
def test_scores_and_flags_match_the_reference(B, H, Hkv, S, D, bs, dtype, variant):
    q, k, _ = planted_qkv(B, H, Hkv, S, D, seed=S, dtype=dtype, device=DEVICE)
    col, diag, _, _ = scores_match(q, k, bs, variant=variant)
    for threshold in (0.005, 0.015):
        got = flags_from_scores(col, diag, bs, threshold)
        want = vertical_slash_flags_reference(q, k, 1 / math.sqrt(D), bs, threshold)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert want[0].any()   # the planted inputs have heavy columns at these thresholds
        # the variant's own flag path ("skew": computed in its last kernel)
        fused = vertical_slash_flags(q, k, 1 / math.sqrt(D), bs, threshold, variant=variant)
        assert torch.equal(fused[0], want[0]) and torch.equal(fused[1], want[1])


@pytest.mark.parametrize("threshold", [0.0, -1.0, 0.02])
def test_skew_flags_at_edge_thresholds_equal_the_rule_on_its_scores(threshold):
    """The fused flags equal ``flags_from_scores`` on the variant's own scores, also where every
    offset is heavy (threshold <= 0: padding and offsets before block 0 must stay out)."""
    q, k, _ = planted_qkv(1, 3, 1, 230, 32, seed=11, dtype=torch.float32, device=DEVICE)
    col, diag = vertical_slash_scores(q, k, 0.2, 32, variant="skew")
    want = flags_from_scores(col, diag, 32, threshold)
    got = vertical_slash_flags(q, k, 0.2, 32, threshold, variant="skew")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_reference_on_the_last_n_rows():
    """``n_rows``: the probe on the prompt's last rows. A whole last block's worth equals the
    default probe; one row's column scores are that row's softmax (computed here directly),
    and one row has no excess on any diagonal."""
    q, k, _ = planted_qkv(1, 4, 2, 256, 32, seed=3, dtype=torch.float32)
    default = vertical_slash_scores_reference(q, k, 0.2, 64)
    last_block = vertical_slash_scores_reference(q, k, 0.2, 64, n_rows=64)
    assert all(torch.equal(a, b) for a, b in zip(default, last_block))
    col, diag = vertical_slash_scores_reference(q, k, 0.2, 64, n_rows=1)
    kk = k.repeat_interleave(2, dim=1)
    want = torch.softmax(0.2 * (q[:, :, -1:] @ kk.transpose(-1, -2)), dim=-1)[:, :, 0]
    assert_close(col, want, 1e-7, 1e-5, "one row's column scores")
    assert torch.equal(diag, torch.zeros_like(diag))
    every = vertical_slash_scores_reference(q, k, 0.2, 64, n_rows=256)
    more = vertical_slash_scores_reference(q, k, 0.2, 64, n_rows=257)   # all S rows
    assert all(torch.equal(a, b) for a, b in zip(every, more))
    for bad in (0, -3):
        with pytest.raises(ValueError, match="n_rows"):
            vertical_slash_scores_reference(q, k, 0.2, 64, n_rows=bad)


# n_rows probe rows: packed query heads per program (``packing``): 4 heads of 32 rows, 2 of 16
# (5 rows padded), 1 (G = 3), one row, more rows than a block, more rows than the prompt.
# The gather variant (the interpreter is slow on its gathers) on the first case only.
@pytest.mark.parametrize("B,H,Hkv,S,D,bs,n_rows,dtype,variant", [
    (1, 8, 2, 300, 32, 64, 32, torch.float32, "skew"),
    (1, 8, 2, 300, 32, 64, 32, torch.float32, "gather"),
    (2, 4, 2, 200, 16, 32, 5, torch.float32, "skew"),
    (1, 6, 2, 257, 32, 128, 16, torch.float16, "skew"),
    (1, 4, 4, 130, 32, 64, 1, torch.float32, "skew"),
    (1, 4, 2, 160, 32, 32, 64, torch.float32, "skew"),
    (1, 2, 1, 40, 32, 32, 64, torch.float32, "skew"),
])
def test_last_rows_probe_matches_the_reference(B, H, Hkv, S, D, bs, n_rows, dtype, variant):
    q, k, _ = planted_qkv(B, H, Hkv, S, D, seed=S + n_rows, dtype=dtype, device=DEVICE)
    scale = 1 / math.sqrt(D)
    col, diag = vertical_slash_scores(q, k, scale, bs, variant=variant, n_rows=n_rows)
    ref_col, ref_diag = vertical_slash_scores_reference(q, k, scale, bs, n_rows=n_rows)
    assert_close(col, ref_col, 2e-6, 1e-4, "column scores")
    assert_close(diag, ref_diag, 2e-6, 1e-4, "diagonal scores")
    if n_rows > 1:
        assert ref_diag.abs().max() > 1e-3      # the diagonals are not all trivially zero
    for threshold in (0.005, 0.015):
        got = vertical_slash_flags(q, k, scale, bs, threshold, variant=variant, n_rows=n_rows)
        want = vertical_slash_flags_reference(q, k, scale, bs, threshold, n_rows)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="n_rows=129"):
        vertical_slash_scores(q, k, scale, bs, variant=variant, n_rows=129)


def test_packing_of_query_heads():
    from fp_compile.kernels.vertical_slash_skew import packing
    assert packing(4, 32) == 4 and packing(4, 128) == 1 and packing(8, 16) == 8
    assert packing(3, 16) == 1 and packing(6, 16) == 2 and packing(16, 16) == 8


@pytest.mark.parametrize("programs_per_sm", [1, 3, 64])
def test_skew_any_number_of_programs(programs_per_sm):
    """One run of key tiles per head, several, or one tile per program: the same scores."""
    q, k, _ = planted_qkv(1, 2, 1, 333, 32, seed=4, dtype=torch.float32, device=DEVICE)
    col, diag = vertical_slash_scores(q, k, 0.2, 32, variant="skew",
                                      programs_per_sm=programs_per_sm)
    ref_col, ref_diag = vertical_slash_scores_reference(q, k, 0.2, 32)
    assert_close(col, ref_col, 2e-6, 1e-4, "column scores")
    assert_close(diag, ref_diag, 2e-6, 1e-4, "diagonal scores")


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_probe_sees_planted_slash_lines(variant):
    """Diagonal scores are not all ~0: the kernel's diagonal path is exercised, not only its
    columns (a probe block of several rows over planted slash lines)."""
    q, k, _ = planted_qkv(1, 4, 2, 320, 32, seed=3, dtype=torch.float32, device=DEVICE)
    _, diag, _, ref_diag = scores_match(q, k, 64, variant=variant)
    assert ref_diag.max() > 0.01 and diag.max() > 0.01


@settings(max_examples=12, deadline=None)
@given(S=st.integers(2, 300), bs=st.sampled_from([16, 32, 64, 128]),
       D=st.sampled_from([16, 24, 64]), groups=st.sampled_from([1, 2, 3]),
       Hkv=st.sampled_from([1, 2]), seed=st.integers(0, 1000),
       random=st.booleans(), variant=st.sampled_from(VARIANTS))
def test_property_scores_match_the_reference(S, bs, D, groups, Hkv, seed, random, variant):
    if random:
        g = torch.Generator().manual_seed(seed)
        q = (torch.randn(1, Hkv * groups, S, D, generator=g) * 2).to(DEVICE)
        k = torch.randn(1, Hkv, S, D, generator=g).to(DEVICE)
    else:
        q, k, _ = planted_qkv(1, Hkv * groups, Hkv, S, D, seed=seed, dtype=torch.float32,
                              device=DEVICE)
    scores_match(q, k, bs, variant=variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_strided_inputs_and_the_dispatch_choice(variant):
    q, k, _ = planted_qkv(1, 4, 2, 160, 32, seed=7, dtype=torch.float32, device=DEVICE)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)     # (B, S, H, D) memory
    scores_match(qt, k[..., :].transpose(-1, -2).contiguous().transpose(-1, -2), 32,
                 variant=variant)
    # kernel=None picks the kernel where it runs, the reference above blocks of 128
    got = vertical_slash_flags(q, k, 0.2, 32, 0.01)
    want = vertical_slash_flags(q, k, 0.2, 32, 0.01, kernel=False)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    big = vertical_slash_flags(q, k, 0.2, 256, 0.01)
    ref = vertical_slash_flags_reference(q, k, 0.2, 256, 0.01)
    assert torch.equal(big[0], ref[0]) and torch.equal(big[1], ref[1])


def test_refuses_large_blocks_and_other_dtypes():
    q, k, _ = planted_qkv(1, 2, 1, 64, 16, seed=0, dtype=torch.float32)
    with pytest.raises(ValueError, match="block_size=256"):
        vertical_slash_scores(q, k, 0.25, 256)
    with pytest.raises(TypeError, match="float16/bfloat16/float32"):
        vertical_slash_scores(q.double(), k.double(), 0.25, 16)
    with pytest.raises(ValueError, match="variant='nope'"):
        vertical_slash_scores(q, k, 0.25, 16, variant="nope")


@gpu
@pytest.mark.parametrize("n_rows", [None, 16, 32])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("H,Hkv,S", [(8, 2, 8192 + 77), (32, 8, 8192)])
def test_gpu_bf16_long_probe_matches_the_reference(variant, H, Hkv, S, n_rows):
    q, k, _ = planted_qkv(1, H, Hkv, S, 128, seed=2, dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    col, diag, ref_col, ref_diag = scores_match(q, k, 128, atol=1e-5, variant=variant,
                                                n_rows=n_rows)
    flags = flags_from_scores(col, diag, 128, 0.015)
    fused = vertical_slash_flags(q, k, 1 / math.sqrt(128), 128, 0.015, variant=variant,
                                 n_rows=n_rows)
    assert torch.equal(flags[0], fused[0]) and torch.equal(flags[1], fused[1])
    ref = vertical_slash_flags_reference(q, k, 1 / math.sqrt(128), 128, 0.015, n_rows)
    # equal except where a score sits within rounding of the threshold
    near = ((ref_col - 0.015).abs() < 1e-5).any() or ((ref_diag - 0.015).abs() < 1e-5).any()
    if not near:
        assert torch.equal(flags[0], ref[0]) and torch.equal(flags[1], ref[1])
    assert ref[0].any()


@pytest.mark.parametrize("variant", VARIANTS)
def test_columns_only_mode_keeps_the_columns(variant):
    q, k, _ = planted_qkv(1, 2, 1, 200, 32, seed=5, dtype=torch.float32, device=DEVICE)
    col, diag = vertical_slash_scores(q, k, 0.2, 64, diagonals=False, variant=variant)
    ref_col, ref_diag = vertical_slash_scores_reference(q, k, 0.2, 64)
    assert_close(col, ref_col, 2e-6, 1e-4, "column scores")
    assert ref_diag.abs().max() > 0 and (diag == 0).all()


@gpu
@pytest.mark.parametrize("vs_rows", [0, 16, 32])
def test_gpu_compiled_op_with_the_detector_equals_eager(vs_rows):
    """The static compiled op traces the probe, the flags and the fused search into Inductor's
    code (a bool flag view once failed to lower there); vs_rows 32: the packed probe."""
    from fp_compile import FlashPrefillConfig, flash_prefill

    cfg = FlashPrefillConfig.paper_rule(vertical_slash=True, min_seq_len=0, vs_rows=vs_rows)
    q, k, v = planted_qkv(1, 8, 2, 4096, 128, seed=1, dtype=torch.bfloat16, device="cuda")

    def op(q, k, v):
        return flash_prefill(q, k, v, enable_gqa=True, config=cfg)

    got = torch.compile(op, fullgraph=True, dynamic=False)(q, k, v)
    assert_close(got, op(q, k, v), 2e-2, 2e-2, "compiled vs eager")


@pytest.mark.parametrize("keys", [16, 64])
def test_skew_key_tiles_of_any_width(keys):
    """Key tiles narrower than the default (at least the padded probe rows): the same scores."""
    q, k, _ = planted_qkv(1, 4, 2, 230, 32, seed=8, dtype=torch.float32, device=DEVICE)
    col, diag = vertical_slash_scores(q, k, 0.2, 64, variant="skew", n_rows=16, keys=keys)
    ref_col, ref_diag = vertical_slash_scores_reference(q, k, 0.2, 64, n_rows=16)
    assert_close(col, ref_col, 2e-6, 1e-4, "column scores")
    assert_close(diag, ref_diag, 2e-6, 1e-4, "diagonal scores")
    with pytest.raises(ValueError, match="keys=48"):
        vertical_slash_scores(q, k, 0.2, 64, variant="skew", keys=48)


@pytest.mark.parametrize("variant", VARIANTS + (None,))
def test_flags_as_uint8_equal_the_bool_flags(variant):
    """flag_dtype=uint8 (what the search reads): the same flags as bytes, from the skew kernel's
    own flag path, the gather variant's and the reference (variant None: kernel=False)."""
    q, k, _ = planted_qkv(1, 4, 2, 300, 32, seed=2, dtype=torch.float32, device=DEVICE)
    kw = dict(kernel=False) if variant is None else dict(variant=variant)
    want = vertical_slash_flags_reference(q, k, 0.2, 64, 0.01, 32)
    got = vertical_slash_flags(q, k, 0.2, 64, 0.01, n_rows=32, flag_dtype=torch.uint8, **kw)
    assert all(g.dtype == torch.uint8 for g in got)
    assert torch.equal(got[0], want[0].to(torch.uint8)) and torch.equal(got[1],
                                                                         want[1].to(torch.uint8))
    assert want[0].any() and want[1].any()
    with pytest.raises(ValueError, match="flag_dtype"):
        from fp_compile.kernels.vertical_slash_skew import skew_scores
        skew_scores(q, k, 0.2, 64, threshold=0.01, flag_dtype=torch.int32)
