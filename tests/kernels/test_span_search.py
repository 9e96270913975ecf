"""The pattern search with a span (issue 11: padded batches, cached prefixes, KV buffers).

The Triton search against its reference (interpreter on CPU, tiny shapes), the reference's
invariants checked from the spec's definitions directly (not through ``span_blocks``), the
full span against the unmasked search, and the options a span refuses.
"""

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fp_compile.demo.synthetic import planted_qkv
from fp_compile.kernels import utils as ku
from fp_compile.kernels.block_means import block_means, key_block_means
from fp_compile.kernels.pattern_search import (pattern_search, pattern_search_reference,
                                               select_mask_reference)
from tests.helpers import DEVICE, assert_close, gpu
from tests.kernels.test_pattern_search import aligned_qk, assert_same_selection


def make_span(p0, ks, ke, device=DEVICE) -> ku.Span:
    def i32(x):
        return torch.tensor(x, dtype=torch.int32, device=device)
    return ku.Span(i32([p0]), i32(ks), i32(ke))


def span_call(B, H, Hkv, S, S_q, p0, D, dtype, seed, device=DEVICE):
    """q of the S_q rows at key positions p0 .. p0 + S_q - 1 of a sequence of S, and its k."""
    q, k = aligned_qk(B, H, Hkv, S, D, dtype, seed=seed, device=device)
    return q[:, :, p0:p0 + S_q], k


def assert_search_matches_reference(q, k, span, block_size, alpha, sink, window, last, shared,
                                    floor, scale=None):
    args = (q, k, scale or 1 / math.sqrt(q.shape[-1]), block_size, alpha, sink, window, last)
    opts = dict(gqa_shared=shared, mass_floor=floor, return_mass=True, span=span)
    num, idx, mass = pattern_search(*args, **opts)
    rnum, ridx, rmass = pattern_search_reference(*args, **opts)
    n, M = ku.span_rows(q.shape[2], block_size), ku.cdiv(k.shape[2], block_size)
    assert num.shape == (q.shape[0], q.shape[1], n) and idx.shape == num.shape + (M,)
    assert_same_selection((num, idx), (rnum, ridx))
    assert_close(mass, rmass, 1e-5, 1e-5, "estimated kept mass")
    return num, idx


@pytest.mark.parametrize("shared", [False, True], ids=["per_head", "shared"])
@pytest.mark.parametrize("floor", [0.0, 0.8])
def test_the_full_span_is_the_unmasked_selection(shared, floor):
    # ks = 0, ke = S, p0 = 0: row t of the span is query block t; the extra row keeps nothing
    B, H, Hkv, S, bs = 2, 4, 2, 150, 16
    M = ku.cdiv(S, bs)
    q, k = aligned_qk(B, H, Hkv, S, 24, torch.float32, seed=11)
    span = make_span(0, [0] * B, [S] * B)
    args = (q, k, 24 ** -0.5, bs, 0.4, 1, 2, 1)
    opts = dict(gqa_shared=shared, mass_floor=floor, return_mass=True)
    for search in (pattern_search, pattern_search_reference):
        num, idx, mass = search(*args, **opts)
        snum, sidx, smass = search(*args, **opts, span=span)
        assert snum.shape == (B, H, M + 1) and sidx.shape == (B, H, M + 1, M)
        assert torch.equal(snum[:, :, :M], num) and torch.equal(sidx[:, :, :M], idx)
        assert torch.equal(smass[:, :, :M], mass)
        assert (snum[:, :, M] == 0).all() and (sidx[:, :, M] == 0).all()


def test_span_block_means_count_only_valid_keys():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(3, 2, 70, 24, generator=g).to(DEVICE)
    v = torch.randn(3, 2, 70, 24, generator=g).to(DEVICE)
    k[1, :, 3] = float("nan")   # a padding key: must not reach any mean
    span = make_span(5, [0, 9, 33], [70, 40, 33])
    kmean, vmean = block_means(k, 16, v, span=span)
    assert_close(kmean, key_block_means(k, 16, span), 1e-6, 1e-5, "kmean")
    assert_close(vmean, key_block_means(v, 16, span), 1e-6, 1e-5, "vmean")
    assert_close(kmean[1, :, 0], k[1, :, 9:16].mean(dim=1), 1e-6, 1e-5, "first partial block")
    assert_close(kmean[1, :, 2], k[1, :, 32:40].mean(dim=1), 1e-6, 1e-5, "last partial block")
    assert (kmean[1, :, 3:] == 0).all() and (kmean[2] == 0).all(), "no valid key: mean 0"


# (B, S, S_q, p0, ks, ke, bs, D, dtype, alpha, sink, window, last)
CASES = {
    "left_padding": (2, 150, 150, 0, [0, 37], [150, 150], 16, 16, torch.float32, 0.4, 1, 1, 1),
    "right_padding": (2, 150, 150, 0, [0, 0], [150, 90], 16, 24, torch.float32, 0.3, 2, 2, 1),
    "both_padding": (3, 140, 140, 0, [10, 33, 0], [130, 100, 140], 16, 16, torch.float32, 0.5,
                     1, 1, 0),
    "queries_at_the_end": (2, 200, 47, 153, [0, 20], [200, 200], 16, 16, torch.float32, 0.3,
                           1, 2, 1),
    "queries_in_the_middle": (2, 200, 70, 45, [3, 0], [200, 120], 16, 32, torch.float32, 0.2,
                              2, 1, 2),
    "keys_end_before_the_queries": (2, 160, 50, 100, [0, 70], [90, 160], 16, 16,
                                    torch.float32, 0.4, 1, 1, 0),
    "no_valid_key_or_query": (3, 130, 60, 50, [50, 120, 0], [50, 130, 0], 16, 16,
                              torch.float32, 0.3, 1, 1, 1),
    "fp16_block_32": (2, 250, 101, 77, [40, 0], [250, 230], 32, 32, torch.float16, 0.3, 1, 2,
                      1),
}


@pytest.mark.parametrize("shared", [False, True], ids=["per_head", "shared"])
@pytest.mark.parametrize("floor", [0.0, 0.8])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_span_search_matches_reference(case, floor, shared):
    B, S, S_q, p0, ks, ke, bs, D, dtype, alpha, sink, window, last = case
    q, k = span_call(B, 4, 2, S, S_q, p0, D, dtype, seed=S + p0)
    assert_search_matches_reference(q, k, make_span(p0, ks, ke), bs, alpha, sink, window, last,
                                    shared, floor)


def test_span_selection_drops_blocks_on_these_inputs():
    # guards the cases above: with a span the threshold must still have work to do
    B, S, S_q, p0, ks, ke, bs, D, dtype, alpha, sink, window, last = CASES["both_padding"]
    q, k = span_call(B, 4, 2, S, S_q, p0, D, dtype, seed=S + p0)
    keep = select_mask_reference(q, k, D ** -0.5, bs, alpha, sink, window, last,
                                 span=make_span(p0, ks, ke))
    rows = keep.any(dim=-1)
    full = torch.ones_like(keep).tril()[..., :keep.shape[-1]]
    assert (keep[rows] != full[rows]).any()


def check_reference_invariants(keep, span_args, S_q, S, bs, sink, window, last):
    """The spec's rule, written out per (b, t) from its definitions: keep (B, H, n, M) bool."""
    p0, ks, ke = span_args
    B, H, n, M = keep.shape
    for b in range(B):
        valid_block = [max(ks[b], j * bs) < min(ke[b], (j + 1) * bs) for j in range(M)]
        L = (min(ke[b], p0 + S_q) - 1) // bs
        for t in range(n):
            i = p0 // bs + t
            R = [r for r in range(S_q) if (p0 + r) // bs == i and p0 + r >= ks[b]]
            C = {j for j in range(M) if j <= i and valid_block[j]}
            for h in range(H):
                row = set(keep[b, h, t].nonzero().flatten().tolist())
                assert row <= C, f"(b, h, t) = {(b, h, t)} keeps {sorted(row - C)} outside C"
                assert all(j <= i for j in row)
                if not R:
                    assert not row, f"(b, t) = {(b, t)}: no row of R, yet keeps {sorted(row)}"
                    continue
                structural = {j for j in C if j < ks[b] // bs + sink or j > i - window
                              or i > L - last}
                assert structural <= row, f"(b, h, t) = {(b, h, t)} lacks {structural - row}"


@st.composite
def span_calls(draw):
    bs = draw(st.sampled_from([16, 32]))
    S = draw(st.integers(1, 5 * bs + 7))
    S_q = draw(st.integers(1, S))
    p0 = draw(st.integers(0, S - S_q))
    B = draw(st.integers(1, 3))
    ks, ke = [], []
    for _ in range(B):
        a, c = sorted(draw(st.lists(st.integers(0, S), min_size=2, max_size=2)))
        ks.append(a)
        ke.append(c)
    return B, bs, S, S_q, p0, ks, ke


@settings(max_examples=15, deadline=None)
@given(span_calls(), st.sampled_from([(1, 1), (2, 1), (4, 2), (4, 1)]),
       st.sampled_from([0.0, 0.2, 0.6]), st.integers(0, 2), st.integers(1, 3),
       st.integers(0, 2), st.booleans(), st.sampled_from([0.0, 0.8]),
       st.sampled_from([torch.float32, torch.float16]), st.integers(0, 2 ** 16))
@example((2, 16, 100, 37, 40, [0, 45], [100, 70]), (4, 2), 0.3, 1, 1, 1, True, 0.8,
         torch.float32, 1)                              # p0 unaligned, one row starting late
@example((1, 32, 20, 20, 0, [0], [20]), (2, 1), 0.5, 1, 1, 0, False, 0.0, torch.float32, 0)
def test_span_search_property(call, heads, alpha, sink, window, last, shared, floor, dtype, seed):
    B, bs, S, S_q, p0, ks, ke = call
    H, Hkv = heads
    q, k = span_call(B, H, Hkv, S, S_q, p0, 16, dtype, seed=seed)
    span = make_span(p0, ks, ke)
    assert_search_matches_reference(q, k, span, bs, alpha, sink, window, last, shared, floor,
                                    scale=0.25)
    keep = select_mask_reference(q, k, 0.25, bs, alpha, sink, window, last, shared,
                                 mass_floor=floor, span=span)
    check_reference_invariants(keep.cpu(), (p0, ks, ke), S_q, S, bs, sink, window, last)


def test_options_a_span_does_not_support_are_refused():
    q, k = span_call(1, 2, 1, 64, 30, 20, 16, torch.float32, seed=0)
    span = make_span(20, [0], [64])
    with pytest.raises(ValueError, match="vertical_slash=True is not supported with a span"):
        select_mask_reference(q, k, 0.25, 16, 0.3, 1, 1, 1, vertical_slash=True, span=span)
    with pytest.raises(ValueError, match="rows= does not combine with a span"):
        pattern_search(q, k, 0.25, 16, 0.3, 1, 1, 1, rows=(0, 1, 2), span=span)
    bad = ku.Span(span.p0.long(), span.ks, span.ke)
    with pytest.raises(ValueError, match="span.p0 must be an int32"):
        pattern_search(q, k, 0.25, 16, 0.3, 1, 1, 1, span=bad)
    with pytest.raises(ValueError, match="span.ks"):
        pattern_search(q, k, 0.25, 16, 0.3, 1, 1, 1, span=make_span(20, [0, 0], [64, 64]))


# ---------------------------------------------------------------------------- GPU (the lead runs)

@gpu
@pytest.mark.parametrize("shared", [False, True], ids=["per_head", "shared"])
@pytest.mark.parametrize("floor", [0.0, 0.9])
def test_gpu_span_search_matches_reference(shared, floor):
    S, S_q, p0 = 4096, 1500, 4096 - 1500 - 77       # unaligned queries, left-padded rows
    q, k, _ = planted_qkv(2, 8, 2, S, 128, seed=9, dtype=torch.bfloat16, device="cuda")
    q = q[:, :, p0:p0 + S_q]
    span = make_span(p0, [0, 333], [S, S], device="cuda")
    args = (q, k, 128 ** -0.5, 128, 0.12, 2, 4, 2)
    opts = dict(gqa_shared=shared, mass_floor=floor, span=span)
    got = pattern_search(*args, **opts)
    expected = pattern_search_reference(*args, **opts)
    assert got[0].shape == (2, 8, ku.span_rows(S_q, 128))
    assert_same_selection(got, expected, max_diff_fraction=2e-3)
    if floor == 0.0:
        M = ku.cdiv(S, 128)
        assert got[0].sum() < 0.9 * (got[0].shape[2] * M * 16), "the threshold should drop blocks"


@gpu
def test_gpu_span_search_captures_in_a_cuda_graph():
    # No host read of p0 / ks / ke: the search captures, and a replay follows new span values.
    S, S_q = 4096, 1500
    q_all, k, _ = planted_qkv(1, 8, 2, S, 128, seed=3, dtype=torch.bfloat16, device="cuda")
    q = q_all[:, :, S - S_q:].clone()
    span = make_span(S - S_q, [0], [S], device="cuda")
    args = (q, k, 128 ** -0.5, 128, 0.12, 2, 4, 2)
    pattern_search(*args, span=span)   # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = pattern_search(*args, span=span)
    p0 = 1000 + 45
    q.copy_(q_all[:, :, p0:p0 + S_q])
    span.p0.fill_(p0)
    span.ks.fill_(200)
    graph.replay()
    torch.cuda.synchronize()
    assert_same_selection(got, pattern_search_reference(*args, span=span),
                          max_diff_fraction=2e-3)
