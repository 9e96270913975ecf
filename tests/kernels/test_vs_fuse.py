"""The vertical/slash flags OR-ed into the Triton pattern search (``vs_blocks``).

What the kernel must compute is the reference's order: guarded selection, then
``add_vertical_slash`` of the flags, then the GQA union when the group shares its blocks
(``select_mask_reference``), compacted. CPU: Triton's interpreter, small shapes, fp32/fp16.
"""

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fp_compile.kernels import utils as ku
from fp_compile.kernels.pattern_search import pattern_search, select_mask_reference
from fp_compile.kernels.vertical_slash import add_vertical_slash, vertical_slash_flags_reference
from fp_compile.demo.synthetic import planted_qkv
from tests.helpers import DEVICE, assert_close
from tests.kernels.test_pattern_search import aligned_qk, assert_same_selection, shapes


def random_flags(B, H, M, seed, p=0.15, dtype=torch.bool):
    """(column_blocks, diagonal_blocks), each (B, H, M), about a share p of them set."""
    g = torch.Generator().manual_seed(seed)
    col = torch.rand(B, H, M, generator=g) < p
    diag = torch.rand(B, H, M, generator=g) < p
    return col.to(DEVICE, dtype), diag.to(DEVICE, dtype)


def expected_selection(q, k, args, flags, shared, mass_floor=0.0):
    """(num, idx, mass) of the reference: selection, + flags, GQA union, compacted."""
    keep, mass = select_mask_reference(q, k, *args, mass_floor=mass_floor, return_mass=True)
    keep = add_vertical_slash(keep, flags[0].bool(), flags[1].bool())
    if shared:
        keep = ku.gqa_union(keep, k.shape[1])
    return (*ku.compact_mask(keep), mass)


# (B, H, Hkv, S, D, block_size, dtype, alpha, sink, window, last_dense)
CASES = [
    (1, 2, 1, 200, 16, 16, torch.float32, 0.5, 1, 1, 0),
    (2, 4, 2, 300, 24, 16, torch.float32, 0.3, 0, 1, 1),     # no sinks, dense last row
    (1, 4, 1, 250, 32, 32, torch.float16, 0.5, 1, 2, 0),     # GQA 4
    (1, 2, 2, 512, 16, 16, torch.float32, 0.9, 1, 1, 2),     # 32 blocks: two tiles a row
    (2, 2, 1, 20, 16, 32, torch.float32, 0.5, 1, 1, 0),      # S < block_size
]


@pytest.mark.parametrize("floor", [0.0, 0.8], ids=["paper", "guard"])
@pytest.mark.parametrize("shared", [False, True], ids=["per_head", "shared"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}kv{}S{}D{}bs{}".format(*c[:6]))
def test_random_flags_match_the_reference(case, shared, floor):
    B, H, Hkv, S, D, bs, dtype, alpha, sink, window, last = case
    q, k = aligned_qk(B, H, Hkv, S, D, dtype, seed=S + D)
    M = ku.cdiv(S, bs)
    flags = random_flags(B, H, M, seed=S)
    args = (1 / math.sqrt(D), bs, alpha, sink, window, last)
    num, idx, mass = expected_selection(q, k, args, flags, shared, floor)
    got = pattern_search(q, k, *args, gqa_shared=shared, mass_floor=floor, return_mass=True,
                         vs_blocks=flags)
    assert_same_selection(got[:2], (num, idx))
    # the mass is the selection's own, before the flags add blocks
    assert_close(got[2], mass, 1e-6, 1e-6, "mass")


def test_flags_add_blocks():
    # guards the random-flag tests: the flags must change the selection
    q, k = aligned_qk(1, 2, 1, 300, 16, torch.float32, seed=9)
    args = (q, k, 0.25, 16, 0.9, 0, 1, 0)
    flags = random_flags(1, 2, 19, seed=1)
    plain = ku.expand_indices(*pattern_search(*args))
    fused = ku.expand_indices(*pattern_search(*args, vs_blocks=flags))
    assert (fused >= plain).all() and (fused > plain).sum() > 20


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int8])
def test_flag_dtypes_and_strides(dtype):
    q, k = aligned_qk(1, 4, 2, 200, 16, torch.float32, seed=2)
    col, diag = random_flags(1, 4, 13, seed=3, p=0.2, dtype=dtype)
    # (B, M, H) storage seen as (B, H, M): the kernel gets them contiguous
    col = col.transpose(1, 2).contiguous().transpose(1, 2)
    args = (0.25, 16, 0.5, 1, 1, 0)
    want = expected_selection(q, k, args, (col, diag), True)
    assert_same_selection(pattern_search(q, k, *args, gqa_shared=True, vs_blocks=(col, diag)),
                          want[:2])


@pytest.mark.parametrize("shared", [False, True], ids=["per_head", "shared"])
def test_detector_flags_on_planted_inputs(shared):
    q, k, _ = planted_qkv(1, 4, 2, 384, 32, seed=6, dtype=torch.float32, device=DEVICE)
    scale = 1 / math.sqrt(32)
    flags = vertical_slash_flags_reference(q, k, scale, 16, 0.01)
    assert flags[0].any() and flags[1][..., 1:].any(), "the input should have heavy lines"
    args = (scale, 16, 0.3, 1, 1, 1)
    # the option of the reference, detector included
    want = ku.compact_mask(select_mask_reference(q, k, *args, gqa_shared=shared,
                                                 vertical_slash=True, vs_threshold=0.01))
    assert_same_selection(pattern_search(q, k, *args, gqa_shared=shared, vs_blocks=flags), want)
    got = pattern_search(q, k, *args, gqa_shared=shared, mass_floor=0.8, vs_blocks=flags)
    assert_same_selection(got, expected_selection(q, k, args, flags, shared, 0.8)[:2])


@pytest.mark.parametrize("shared", [False, True], ids=["per_head", "shared"])
@pytest.mark.parametrize("rows", [(0, 1, 13), (3, 3, 4), (12, 1, 1), (2, 5, 3), (5, 1, 4)])
def test_rows_use_the_absolute_query_block(rows, shared):
    # the dispatch's chunks and probe: row r is query block start + r * step of the flags too
    q, k = aligned_qk(2, 4, 2, 200, 24, torch.float32, seed=3)
    flags = random_flags(2, 4, 13, seed=4, p=0.25)
    args = (24 ** -0.5, 16, 0.3, 1, 1, 1)
    num, idx, mass = expected_selection(q, k, args, flags, shared, 0.8)
    got_num, got_idx, got_mass = pattern_search(q, k, *args, gqa_shared=shared, mass_floor=0.8,
                                                return_mass=True, rows=rows, vs_blocks=flags)
    start, step, n = rows
    picked = torch.arange(start, start + step * n, step)
    assert torch.equal(got_num, num[:, :, picked]) and torch.equal(got_idx, idx[:, :, picked])
    assert_close(got_mass, mass[:, :, picked], 1e-6, 1e-6)


@settings(max_examples=12, deadline=None)
@given(shapes(max_blocks=6, head_dims=(16, 24, 40)), st.sampled_from([0.1, 0.5, 0.9]),
       st.integers(0, 2), st.integers(1, 3),
       st.integers(0, 2), st.booleans(), st.sampled_from([0.0, 0.8]),
       st.sampled_from([0.0, 0.1, 0.5]), st.sampled_from([torch.float32, torch.float16]),
       st.integers(0, 2**16))
@example((1, 1, 1, 1, 16, 16), 0.5, 1, 1, 0, False, 0.0, 0.5, torch.float32, 0)   # one token
@example((2, 8, 2, 47, 24, 16), 0.1, 0, 1, 0, True, 0.8, 0.1, torch.float16, 7)   # GQA 4
def test_matches_reference_property(shape, alpha, sink, window, last, shared, floor, p,
                                    dtype, seed):
    B, H, Hkv, S, D, bs = shape
    q, k = aligned_qk(B, H, Hkv, S, D, dtype, seed=seed)
    flags = random_flags(B, H, ku.cdiv(S, bs), seed=seed + 1, p=p)
    args = (0.7 / math.sqrt(D), bs, alpha, sink, window, last)
    num, idx, _ = expected_selection(q, k, args, flags, shared, floor)
    assert_same_selection(pattern_search(q, k, *args, gqa_shared=shared, mass_floor=floor,
                                         vs_blocks=flags), (num, idx))


def test_a_span_is_refused():
    q, k = aligned_qk(1, 2, 1, 64, 16, torch.float32)
    span = ku.Span(*(torch.tensor(v, dtype=torch.int32, device=DEVICE)
                     for v in ([0], [0], [64])))
    with pytest.raises(ValueError, match="vs_blocks.*span"):
        pattern_search(q, k, 0.25, 16, 0.3, 1, 1, 1, span=span,
                       vs_blocks=random_flags(1, 2, 4, seed=0))


@pytest.mark.parametrize("bad", [
    "not a pair",
    (torch.zeros(1, 2, 4, dtype=torch.bool),),
    (torch.zeros(1, 2, 5, dtype=torch.bool), torch.zeros(1, 2, 4, dtype=torch.bool)),
    (torch.zeros(1, 2, 4, dtype=torch.bool), torch.zeros(1, 2, 4, dtype=torch.float32)),
    (torch.zeros(1, 1, 4, dtype=torch.bool), torch.zeros(1, 2, 4, dtype=torch.bool)),
], ids=["type", "one", "shape_M", "dtype", "shape_H"])
def test_bad_flags_are_refused(bad):
    q, k = aligned_qk(1, 2, 1, 64, 16, torch.float32)
    with pytest.raises(ValueError, match="vs_blocks"):
        pattern_search(q, k, 0.25, 16, 0.3, 1, 1, 1, vs_blocks=bad)
