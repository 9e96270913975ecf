"""Block-sparse attention with a span (padded rows, queries at an offset p0) and its LSE output.

The definition is ``utils.span_visible``: with every candidate block kept, kernel and reference
must be plain masked softmax attention over it (rows that see no key: 0, LSE -inf). CPU: the
Triton interpreter, tiny shapes, fp32/fp16; the GPU test runs a long bf16 call.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fp_compile.kernels import utils as ku
from fp_compile.kernels.block_sparse_attention import (block_sparse_attention,
                                                       block_sparse_attention_reference)
from tests.helpers import DEVICE, assert_close, gpu
from tests.kernels.test_block_sparse_attention import TOLERANCE, make_qkv, rel_l2


def make_span(p0, ks, ke, device=DEVICE):
    return ku.Span(torch.tensor([p0], dtype=torch.int32, device=device),
                   torch.tensor(ks, dtype=torch.int32, device=device),
                   torch.tensor(ke, dtype=torch.int32, device=device))


def candidate_keep(span, H, S_q, S, block_size):
    """(B, H, n, M) bool: every candidate block of every selection row (the spec's C, and
    nothing for rows without a query of the call), read on the host (tests only)."""
    p0 = int(span.p0)
    n, M = ku.span_rows(S_q, block_size), ku.cdiv(S, block_size)
    i = p0 // block_size + torch.arange(n)[:, None]                      # (n, 1)
    j = torch.arange(M)[None, :]
    has_rows = i * block_size < p0 + S_q
    rows = []
    for ks, ke in zip(span.ks.tolist(), span.ke.tolist()):
        cand = (j <= i) & (j >= ks // block_size) & (j <= (ke - 1) // block_size) & (ke > ks)
        rows.append(cand & has_rows)
    return torch.stack(rows)[:, None].expand(-1, H, n, M)


def compact(keep, device=DEVICE):
    return tuple(t.to(device) for t in ku.compact_mask(keep))


def masked_softmax_attention(q, k, v, scale, visible):
    """Dense attention under a (B, S_q, S) visibility, in fp64; rows that see nothing give 0.
    Returns (out, lse)."""
    G = q.shape[1] // k.shape[1]
    kf, vf = (t.double().repeat_interleave(G, dim=1) for t in (k, v))
    logits = scale * q.double() @ kf.transpose(-1, -2)
    logits = logits.masked_fill(~visible[:, None], float("-inf"))
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return p @ vf, torch.logsumexp(logits, dim=-1)


def run_both(q, k, v, num, idx, scale, bs, span, tile=None):
    """Kernel (into NaN-poisoned buffers) and reference, each with its LSE."""
    B, H, S_q, _ = q.shape
    out = torch.full_like(q, float("nan"))
    lse = torch.full((B, H, S_q), float("nan"), device=q.device)
    got = block_sparse_attention(q, k, v, num, idx, scale, bs, span=span, lse=lse, out=out,
                                 tile=tile)
    assert got is out
    assert not got.isnan().any() and not lse.isnan().any(), "an element was not written"
    ref, ref_lse = block_sparse_attention_reference(q, k, v, num, idx, scale, bs, span=span,
                                                    return_lse=True)
    assert not ref.isnan().any()
    return got, lse, ref, ref_lse


def assert_lse_close(actual, expected, atol, rtol, what="lse"):
    """Equal -inf where the row sees nothing, close elsewhere."""
    inf = expected == float("-inf")
    assert torch.equal(actual == float("-inf"), inf), f"{what}: -inf rows differ"
    assert_close(actual.masked_fill(inf, 0.0), expected.masked_fill(inf, 0.0), atol, rtol, what)


# name: (B, H, Hkv, S, S_q, p0, ks, ke, D)
SPANS = {
    "left_padding": (2, 2, 2, 90, 90, 0, [0, 23], [90, 90], 16),
    "right_padding": (2, 2, 1, 80, 80, 0, [0, 0], [80, 41], 32),
    "p0_unaligned": (1, 4, 2, 120, 50, 37, [5], [120], 16),
    # batch row 1 starts after p0: its first 15 rows see nothing
    "bottom_right_left_padding_gqa": (2, 4, 2, 100, 45, 55, [0, 70], [100, 100], 32),
    # both paddings; batch row 2's valid keys start after every query: a row of zeros
    "both_paddings_and_an_empty_row": (3, 2, 1, 64, 30, 20, [0, 10, 60], [64, 40, 64], 16),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("name", list(SPANS))
def test_all_candidates_kept_is_masked_softmax(name, block_size, dtype):
    B, H, Hkv, S, S_q, p0, ks, ke, D = SPANS[name]
    q, k, v = make_qkv(B, H, Hkv, S, D, dtype, seed=S + p0)
    q = q[:, :, :S_q]
    span = make_span(p0, ks, ke)
    num, idx = compact(candidate_keep(span, H, S_q, S, block_size))
    scale = D ** -0.5
    got, lse, ref, ref_lse = run_both(q, k, v, num, idx, scale, block_size, span)
    dense, dense_lse = masked_softmax_attention(q, k, v, scale, ku.span_visible(span, S_q, S))
    atol, rtol = TOLERANCE[dtype]
    assert_close(ref, dense, atol, rtol, "reference")
    assert_close(got, dense, atol, rtol, "kernel")
    assert_lse_close(ref_lse, dense_lse, 1e-5, 1e-5, "reference lse")
    assert_lse_close(lse, dense_lse, atol, rtol, "kernel lse")
    silent = ~ku.span_visible(span, S_q, S).any(-1)          # (B, S_q) rows that see nothing
    assert (got[silent[:, None].expand(-1, H, -1)] == 0).all()


@pytest.mark.parametrize("tile", [(16, 16, 4, 1), (16, 32, 4, 1), (32, 16, 4, 1)],
                         ids=lambda t: f"BM{t[0]}_BN{t[1]}")
def test_query_tiles_smaller_than_the_block_with_an_unaligned_p0(tile):
    """Tiles of 16 rows in blocks of 32 (the GPU's sub-tiles): absolute tiles from p0's own."""
    B, H, Hkv, S, S_q, p0, bs = 2, 2, 1, 110, 53, 41, 32
    q, k, v = make_qkv(B, H, Hkv, S, 16, torch.float32, seed=2)
    q = q[:, :, :S_q]
    span = make_span(p0, [3, 50], [110, 101])
    num, idx = compact(candidate_keep(span, H, S_q, S, bs))
    got, lse, ref, ref_lse = run_both(q, k, v, num, idx, 0.25, bs, span, tile=tile)
    dense, dense_lse = masked_softmax_attention(q, k, v, 0.25, ku.span_visible(span, S_q, S))
    assert_close(got, dense, 2e-5, 2e-5)
    assert_lse_close(lse, dense_lse, 2e-5, 2e-5)


def random_keep(B, H, n, M, density, seed):
    """Random kept sets over all key blocks (entries after the diagonal included: ignored)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, H, n, M, generator=g) < density


@pytest.mark.parametrize("name", list(SPANS))
@pytest.mark.parametrize("density", [0.2, 0.6])
def test_random_kept_sets_match_the_reference(name, density):
    B, H, Hkv, S, S_q, p0, ks, ke, D = SPANS[name]
    bs = 16
    q, k, v = make_qkv(B, H, Hkv, S, D, torch.float32, seed=7)
    q = q[:, :, :S_q]
    span = make_span(p0, ks, ke)
    num, idx = compact(random_keep(B, H, ku.span_rows(S_q, bs), ku.cdiv(S, bs), density, 7))
    got, lse, ref, ref_lse = run_both(q, k, v, num, idx, 0.3, bs, span)
    assert_close(got, ref, 2e-5, 2e-5)
    assert_lse_close(lse, ref_lse, 2e-5, 2e-5)


@pytest.mark.parametrize("S,bs", [(70, 16), (64, 32)])
def test_a_full_span_is_the_call_without_one(S, bs):
    """ks = 0, ke = S, p0 = 0: selection row t is query block t, as without a span (whose
    NaN rows, those with an empty kept list, become 0 with a span)."""
    B, H, Hkv, D = 2, 2, 1, 16
    q, k, v = make_qkv(B, H, Hkv, S, D, torch.float32, seed=S)
    M = ku.cdiv(S, bs)
    keep = random_keep(B, H, M, M, 0.5, seed=S)
    num, idx = compact(keep)
    plain_lse = torch.empty(B, H, S, device=q.device)
    plain = block_sparse_attention(q, k, v, num, idx, 0.25, bs, lse=plain_lse)
    span_keep = torch.cat([keep, torch.zeros(B, H, 1, M, dtype=torch.bool)], dim=2)
    snum, sidx = compact(span_keep)
    span = make_span(0, [0] * B, [S] * B)
    got, lse, ref, ref_lse = run_both(q, k, v, snum, sidx, 0.25, bs, span)
    assert_close(got, plain.nan_to_num(0.0), 1e-6, 1e-6)
    assert_lse_close(lse, plain_lse, 1e-6, 1e-6)
    plain_ref, plain_ref_lse = block_sparse_attention_reference(q, k, v, num, idx, 0.25, bs,
                                                                return_lse=True)
    assert_close(ref, plain_ref.nan_to_num(0.0), 0, 0)
    assert_lse_close(ref_lse, plain_ref_lse, 0, 0)


def test_an_aligned_span_equals_the_q_start_call():
    B, H, Hkv, S, D, bs, i0, i1 = 1, 2, 2, 100, 16, 16, 2, 5
    q, k, v = make_qkv(B, H, Hkv, S, D, torch.float32, seed=12)
    M = ku.cdiv(S, bs)
    keep = random_keep(B, H, M, M, 0.5, seed=12) | torch.eye(M, dtype=torch.bool)
    r0, r1 = i0 * bs, i1 * bs
    num, idx = compact(keep[:, :, i0:i1])
    chunk = block_sparse_attention(q[:, :, r0:r1], k, v, num, idx, 0.25, bs, q_start=r0)
    snum, sidx = compact(torch.cat([keep[:, :, i0:i1], keep[:, :, i1:i1 + 1]], dim=2))
    span = make_span(r0, [0], [S])
    got = block_sparse_attention(q[:, :, r0:r1], k, v, snum, sidx, 0.25, bs, span=span)
    assert_close(got, chunk, 1e-6, 1e-6)


def test_lse_without_a_span_is_logsumexp_of_the_kept_causal_logits():
    B, H, Hkv, S, D, bs = 2, 2, 1, 75, 16, 16
    q, k, v = make_qkv(B, H, Hkv, S, D, torch.float16, seed=3)
    M = ku.cdiv(S, bs)
    keep = random_keep(B, H, M, M, 0.4, seed=3) | torch.eye(M, dtype=torch.bool)
    num, idx = compact(keep)
    lse = torch.full((B, H, S), float("nan"), device=q.device)
    out = block_sparse_attention(q, k, v, num, idx, 0.3, bs, lse=lse)
    ref, ref_lse = block_sparse_attention_reference(q, k, v, num, idx, 0.3, bs, return_lse=True)
    assert_close(out, ref, *TOLERANCE[torch.float16])
    rows = torch.arange(S)
    allowed = keep[:, :, rows // bs][..., rows // bs] & (rows[None, :] <= rows[:, None])
    logits = 0.3 * q.double() @ k.double().repeat_interleave(H // Hkv, 1).transpose(-1, -2)
    expected = torch.logsumexp(logits.masked_fill(~allowed.to(q.device), float("-inf")), -1)
    assert_lse_close(ref_lse, expected, 1e-5, 1e-5)
    assert_lse_close(lse, expected, *TOLERANCE[torch.float16])


def test_refused_combinations():
    q, k, v = make_qkv(1, 2, 2, 48, 16, torch.float32)
    span = make_span(5, [0], [48])
    num, idx = compact(candidate_keep(span, 2, 40, 48, 16))
    q = q[:, :, :40]
    for f in (block_sparse_attention, block_sparse_attention_reference):
        with pytest.raises(ValueError, match="mean_correction=True is not supported with a span"):
            f(q, k, v, num, idx, 0.25, 16, mean_correction=True, span=span)
        with pytest.raises(ValueError, match="q_start"):
            f(q[:, :, :32], k, v, num, idx, 0.25, 16, q_start=16, span=span)
    lse = torch.empty(1, 2, 40)
    with pytest.raises(ValueError, match="mean_correction"):
        block_sparse_attention(q, k, v, num, idx, 0.25, 16, mean_correction=True, lse=lse)
    with pytest.raises(ValueError, match="mean_correction"):
        block_sparse_attention_reference(q, k, v, num, idx, 0.25, 16, True, return_lse=True)
    with pytest.raises(ValueError, match="span_rows"):
        block_sparse_attention(q, k, v, num[:, :, :-1], idx[:, :, :-1], 0.25, 16, span=span)
    with pytest.raises(ValueError, match="lse"):
        block_sparse_attention(q, k, v, num, idx, 0.25, 16, span=span, lse=lse.half())


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 3), Hkv=st.integers(1, 2), groups=st.sampled_from([1, 2]),
       S=st.integers(1, 140), frac=st.floats(0.0, 1.0), p0_frac=st.floats(0.0, 1.0),
       D=st.sampled_from([16, 24]), block_size=st.sampled_from([16, 32]),
       density=st.floats(0.0, 1.0), data=st.data())
@example(B=1, Hkv=1, groups=1, S=1, frac=1.0, p0_frac=0.0, D=16, block_size=16, density=0.0,
         data=None)
def test_property_span_attention(B, Hkv, groups, S, frac, p0_frac, D, block_size, density,
                                 data):
    S_q = max(1, round(frac * S))
    p0 = round(p0_frac * (S - S_q))
    if data is None:   # the pinned example: one key, one row
        ks, ke = [0] * B, [S] * B
    else:
        ks = data.draw(st.lists(st.integers(0, S), min_size=B, max_size=B), "ks")
        ke = [data.draw(st.integers(0, S), f"ke{b}") for b in range(B)]
        ke = [max(a, e) if data.draw(st.booleans(), f"ordered{b}") else e
              for b, (a, e) in enumerate(zip(ks, ke))]     # ke < ks: no valid key at all
    H = Hkv * groups
    q, k, v = make_qkv(B, H, Hkv, S, D, torch.float32, seed=S * 7 + B)
    q = q[:, :, :S_q]
    span = make_span(p0, ks, ke)
    scale = 1 / math.sqrt(D)
    n, M = ku.span_rows(S_q, block_size), ku.cdiv(S, block_size)
    num, idx = compact(random_keep(B, H, n, M, density, seed=S))
    got, lse, ref, ref_lse = run_both(q, k, v, num, idx, scale, block_size, span)
    assert_close(got, ref, 2e-5, 2e-5)
    assert_lse_close(lse, ref_lse, 2e-5, 2e-5)
    num, idx = compact(candidate_keep(span, H, S_q, S, block_size))
    ref, ref_lse = block_sparse_attention_reference(q, k, v, num, idx, scale, block_size,
                                                    span=span, return_lse=True)
    dense, dense_lse = masked_softmax_attention(q, k, v, scale, ku.span_visible(span, S_q, S))
    assert_close(ref, dense, 1e-5, 1e-5)
    assert_lse_close(ref_lse, dense_lse, 1e-5, 1e-5)


# ----------------------------------------------------------------------------------- GPU


@gpu
def test_gpu_bf16_long_unaligned_left_padded():
    B, H, Hkv, S, S_q, D, bs = 2, 8, 2, 4096, 1500, 128, 128
    p0 = 2501   # not a multiple of the block nor of any tile
    span = make_span(p0, [0, 1234], [S, S], device="cuda")
    q, k, v = make_qkv(B, H, Hkv, S, D, torch.bfloat16, seed=11, device="cuda")
    q = q[:, :, p0:p0 + S_q]
    num, idx = compact(candidate_keep(span, H, S_q, S, bs), device="cuda")
    out = torch.full_like(q, float("nan"))
    lse = torch.full((B, H, S_q), float("nan"), device="cuda")
    got = block_sparse_attention(q, k, v, num, idx, D ** -0.5, bs, span=span, lse=lse, out=out)
    assert torch.isfinite(got).all() and torch.isfinite(lse).all()
    ref, ref_lse = block_sparse_attention_reference(q, k, v, num, idx, D ** -0.5, bs,
                                                    span=span, return_lse=True)
    assert rel_l2(got, ref) <= 1e-2
    assert_close(lse, ref_lse, 2e-2, 2e-3, "lse")
    dense, dense_lse = masked_softmax_attention(q, k, v, D ** -0.5,
                                                ku.span_visible(span, S_q, S))
    assert rel_l2(got, dense) <= 1e-2
    assert_close(lse, dense_lse, 2e-2, 2e-3, "lse against dense")


@gpu
def test_gpu_cuda_graph_replays_with_new_span_values():
    """p0, ks, ke are read on the device: a captured call follows their new values."""
    B, H, Hkv, S, S_q, D, bs = 2, 4, 2, 2048, 700, 64, 128
    q, k, v = make_qkv(B, H, Hkv, S, D, torch.bfloat16, seed=5, device="cuda")
    q = q[:, :, :S_q]
    span = make_span(300, [0, 100], [S, 1900], device="cuda")
    n, M = ku.span_rows(S_q, bs), ku.cdiv(S, bs)
    num, idx = compact(torch.ones(B, H, n, M, dtype=torch.bool), device="cuda")
    out = torch.empty_like(q)
    lse = torch.empty(B, H, S_q, device="cuda")
    block_sparse_attention(q, k, v, num, idx, 0.125, bs, span=span, lse=lse, out=out)  # tune
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        block_sparse_attention(q, k, v, num, idx, 0.125, bs, span=span, lse=lse, out=out)
    for p0, ks, ke in ((300, [0, 100], [S, 1900]), (1111, [7, 1200], [1500, S])):
        span.p0.fill_(p0)
        span.ks.copy_(torch.tensor(ks, dtype=torch.int32))
        span.ke.copy_(torch.tensor(ke, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        ref, ref_lse = block_sparse_attention_reference(q, k, v, num, idx, 0.125, bs,
                                                        span=span, return_lse=True)
        assert rel_l2(out, ref) <= 1e-2
        assert_lse_close(lse, ref_lse, 2e-2, 2e-3)
