"""Property tests of the plain-torch reference against dense SDPA and the selection rules."""

import math

import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fp_compile.kernels import utils as ku
from fp_compile.kernels.block_means import key_block_means
from fp_compile.kernels.block_sparse_attention import block_sparse_attention_reference
from fp_compile.kernels.pattern_search import block_scores_reference, select_mask_reference
from fp_compile.demo.synthetic import planted_qkv
from tests.helpers import assert_close, flash_prefill_reference

TOL = {torch.float32: (2e-5, 2e-5), torch.float64: (1e-10, 1e-10)}


@st.composite
def shapes(draw):
    groups = draw(st.sampled_from([1, 2, 3, 4, 8]))
    kv_heads = draw(st.integers(1, 2))
    block = draw(st.sampled_from([16, 32]))
    seq = draw(st.integers(1, 5 * block + 7))
    head_dim = draw(st.sampled_from([16, 24, 40, 64, 128, 256]))
    batch = draw(st.integers(1, 2))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return batch, kv_heads * groups, kv_heads, seq, head_dim, block, dtype


def make(batch, heads, kv_heads, seq, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq, head_dim, generator=g, dtype=dtype)
    k = torch.randn(batch, kv_heads, seq, head_dim, generator=g, dtype=dtype)
    v = torch.randn(batch, kv_heads, seq, head_dim, generator=g, dtype=dtype)
    return q, k, v


@settings(max_examples=30, deadline=None)
@given(shapes())
@example((1, 1, 1, 1, 16, 16, torch.float32))        # one token
@example((2, 8, 1, 33, 24, 16, torch.float64))       # partial last block, GQA 8
def test_alpha_zero_equals_dense(shape):
    B, H, Hkv, S, D, block, dtype = shape
    q, k, v = make(B, H, Hkv, S, D, dtype)
    scale = 1 / math.sqrt(D)
    out = flash_prefill_reference(q, k, v, scale, block, 0.0, 1, 1, 0, 0)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hkv)
    assert_close(out, dense, *TOL[dtype])


def structured(B, H, Hkv, S, D, seed):
    q, k, v = planted_qkv(B, H, Hkv, S, D, seed=seed, dtype=torch.float64)
    return q, k, v


@settings(max_examples=25, deadline=None)
@given(shapes(), st.floats(0.0, 1.0), st.integers(0, 3), st.integers(1, 4), st.integers(0, 3),
       st.booleans(), st.integers(0, 2**16))
def test_selection_invariants(shape, alpha, sinks, window, last, shared, seed):
    B, H, Hkv, S, D, block, _ = shape
    q, k, _ = structured(B, H, Hkv, S, D, seed)
    keep = select_mask_reference(q, k, 1 / math.sqrt(D), block, alpha, sinks, window, last,
                                     gqa_shared=shared)
    M = ku.cdiv(S, block)
    assert keep.shape == (B, H, M, M)
    i = torch.arange(M)[:, None]
    j = torch.arange(M)[None, :]
    assert not (keep & (j > i)).any(), "block after the diagonal kept"
    must = ((j < sinks) | (j > i - window) | (i >= M - last)) & (j <= i)
    assert keep[..., must].all(), "a sink / window / last-row block was dropped"
    num, idx = ku.compact_mask(keep)
    assert torch.equal(num, keep.sum(-1, dtype=torch.int32))
    for b, h, r in [(0, 0, M - 1), (B - 1, H - 1, M // 2)]:
        row = idx[b, h, r, : num[b, h, r]]
        assert torch.equal(row, torch.nonzero(keep[b, h, r]).flatten().to(torch.int32))
        assert (row[1:] > row[:-1]).all(), "indices not strictly ascending"
        assert (idx[b, h, r, num[b, h, r]:] == 0).all(), "unused entries must be 0"
    assert torch.equal(ku.expand_indices(num, idx), keep)
    if shared and H != Hkv:
        grouped = keep.unflatten(1, (Hkv, H // Hkv))
        assert (grouped == grouped[:, :, :1]).all(), "heads of a group must share one kept set"


@settings(max_examples=20, deadline=None)
@given(shapes(), st.floats(0.0, 0.9), st.floats(0.0, 0.1), st.integers(0, 2**16))
def test_raising_alpha_never_adds_a_block(shape, alpha, delta, seed):
    B, H, Hkv, S, D, block, _ = shape
    q, k, _ = structured(B, H, Hkv, S, D, seed)
    args = (1 / math.sqrt(D), block)
    low = select_mask_reference(q, k, *args, alpha, 1, 1, 0)
    high = select_mask_reference(q, k, *args, alpha + delta, 1, 1, 0)
    assert not (high & ~low).any()


@settings(max_examples=20, deadline=None)
@given(shapes(), st.floats(0.05, 0.9), st.booleans(), st.integers(0, 2**16))
def test_output_rows_are_convex_combinations_of_visible_values(shape, alpha, corrected, seed):
    B, H, Hkv, S, D, block, _ = shape
    q, k, v = structured(B, H, Hkv, S, D, seed)
    out = flash_prefill_reference(q, k, v, 1 / math.sqrt(D), block, alpha, 1, 1, 0, 0,
                                      mean_correction=corrected)
    v_rep = v.repeat_interleave(H // Hkv, dim=1)
    lo = v_rep.cummin(dim=2).values
    hi = v_rep.cummax(dim=2).values
    eps = 1e-9
    assert (out >= lo - eps).all() and (out <= hi + eps).all()


def test_selection_is_sparse_and_accurate_on_planted_structure():
    S, D = 4096, 64
    q, k, v = planted_qkv(1, 4, 2, S, D, seed=3)
    scale = 1 / math.sqrt(D)
    keep = select_mask_reference(q, k, scale, 128, 0.12, 2, 4, 2)
    num, idx = ku.compact_mask(keep)
    out = block_sparse_attention_reference(q, k, v, num, idx, scale, 128)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    M = keep.shape[-1]
    density = num.sum().item() / (num.numel() * (M + 1) / 2)
    err = ((out - dense).norm() / dense.norm()).item()
    print(f"planted S={S}: density {density:.3f}, rel L2 error {err:.4f}")
    assert density < 0.75
    assert err < 0.2


def test_padding_rows_do_not_add_to_scores():
    # Same first 40 tokens; the partial block's score must not depend on the padding.
    q, k, _ = make(1, 2, 2, 40, 16, torch.float64, seed=5)
    kmean = key_block_means(k, 16)
    assert_close(kmean[:, :, 2], k[:, :, 32:40].mean(dim=2), 1e-12, 1e-12, "partial block mean")
    s = block_scores_reference(q, kmean, 0.25, 16, 2, 3)
    rows = 0.25 * q[:, :, 32:40] @ kmean[:, :, :2].transpose(-1, -2)
    expected = torch.exp(rows - rows.amax(dim=(-2, -1), keepdim=True)).sum(dim=-2)
    assert_close(s[:, :, 0, :2], expected, 1e-12, 1e-12, "block scores")
    assert (s[:, :, 0, 2:] == 0).all()


def test_nan_in_keys_spreads_like_dense():
    q, k, v = planted_qkv(1, 2, 2, 256, 32, seed=1, dtype=torch.float64)
    k[0, 0, 40] = float("nan")
    out = flash_prefill_reference(q, k, v, 1 / math.sqrt(32), 32, 0.5, 1, 1, 0, 0)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(out.isnan(), dense.isnan())


def test_memory_is_chunked(monkeypatch):
    # With a tiny chunk budget the result must not change: the chunk loops are exercised.
    q, k, v = make(1, 2, 1, 100, 16, torch.float64, seed=2)
    full = flash_prefill_reference(q, k, v, 0.25, 16, 0.3, 1, 1, 0, 0, mean_correction=True)
    monkeypatch.setattr(ku, "CHUNK_BYTES", 1)
    chunked = flash_prefill_reference(q, k, v, 0.25, 16, 0.3, 1, 1, 0, 0,
                                      mean_correction=True)
    assert_close(chunked, full, 1e-12, 1e-12)
