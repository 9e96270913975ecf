"""The Triton block-sparse attention kernel against its plain-torch definition (reference.py).

CPU: runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), small shapes,
fp32/fp16 only (bf16 dots are wrong in the interpreter). GPU-marked tests run long sequences.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fp_compile import FlashPrefillConfig, dispatch
from fp_compile.accuracy import rel_l2
from fp_compile.kernels import utils as ku
from fp_compile.kernels.block_means import key_block_stats
from fp_compile.kernels.block_sparse_attention import (_gpu_tiles, block_sparse_attention,
                                                       block_sparse_attention_reference)
from tests.helpers import DEVICE, assert_close, gpu


# (atol, rtol) per dtype: fp16/bf16 round p to the input dtype before the P @ V dot.
TOLERANCE = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3),
             torch.bfloat16: (2e-2, 2e-2)}


def make_qkv(B, H, Hkv, S, D, dtype, seed=0, device=DEVICE):
    """Random q, k, v (never zeros); k has a few heavy keys so softmax rows are not flat."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S, D, generator=g)
    k = torch.randn(B, Hkv, S, D, generator=g)
    v = torch.randn(B, Hkv, S, D, generator=g) + 0.5
    k[:, :, torch.randperm(S, generator=g)[: max(1, S // 10)]] *= 2.0
    return (t.to(device, dtype) for t in (q, k, v))


def random_selection(B, H, S, block_size, density, seed=0, device=DEVICE,
                     keep_diagonal=True):
    """Compact (kv_num_blocks, kv_indices) from a random causal block mask.

    The diagonal is always kept (keep_diagonal=False: dropped at random, with block 0 kept
    instead, so no row is empty).
    """
    M = ku.cdiv(S, block_size)
    g = torch.Generator().manual_seed(seed + 1000)
    keep = torch.rand(B, H, M, M, generator=g) < density
    i = torch.arange(M)
    keep &= i[None, :] <= i[:, None]
    eye = torch.eye(M, dtype=torch.bool)
    if keep_diagonal:
        keep |= eye
    else:
        keep[..., 0] = True
        keep &= ~eye | (torch.rand(B, H, M, M, generator=g) < 0.5)
    num, idx = ku.compact_mask(keep)
    return num.to(device), idx.to(device)


def poisoned_like(q):
    return torch.full_like(q, float("nan"))


def check(B, H, Hkv, S, D, block_size, dtype, density=0.4, mean_correction=False, tile=None,
          seed=0, keep_diagonal=True):
    """Kernel (into a NaN-poisoned buffer) == reference on a random selection."""
    q, k, v = make_qkv(B, H, Hkv, S, D, dtype, seed)
    num, idx = random_selection(B, H, S, block_size, density, seed, keep_diagonal=keep_diagonal)
    scale = 1.0 / math.sqrt(D)
    out = poisoned_like(q)
    got = block_sparse_attention(q, k, v, num, idx, scale, block_size,
                                 mean_correction=mean_correction, tile=tile, out=out)
    assert got is out and got.dtype == q.dtype and got.shape == q.shape
    assert not got.isnan().any(), "some output elements were not written"
    expected = block_sparse_attention_reference(q, k, v, num, idx, scale, block_size,
                                                mean_correction)
    atol, rtol = TOLERANCE[dtype]
    assert_close(got, expected, atol, rtol)


# (B, H, Hkv, S, D, block_size, dtype): odd lengths, S < block, one block, GQA 1/2/4.
CASES = [
    (1, 2, 2, 100, 16, 16, torch.float32),   # partial last block
    (2, 4, 2, 64, 32, 16, torch.float32),    # S a multiple of the block, batch 2
    (1, 4, 1, 75, 24, 32, torch.float16),    # D not a power of two, GQA 4
    (1, 2, 1, 13, 64, 16, torch.float32),    # S < block: one partial block
    (1, 2, 2, 32, 16, 32, torch.float16),    # exactly one block
    (2, 2, 1, 97, 64, 32, torch.float16),
]


@pytest.mark.parametrize("mean_correction", [False, True], ids=["plain", "mean_corr"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_H{}_Hkv{}_S{}_D{}_bs{}_{}".format(
    *c[:6], str(c[6]).split(".")[-1]))
def test_matches_reference(case, mean_correction):
    check(*case, mean_correction=mean_correction)


@pytest.mark.parametrize("tile", [(16, 16, 4, 1), (16, 32, 4, 1), (32, 16, 4, 1)],
                         ids=lambda t: f"BM{t[0]}_BN{t[1]}")
@pytest.mark.parametrize("mean_correction", [False, True], ids=["plain", "mean_corr"])
def test_sub_tiles_of_a_selection_block(tile, mean_correction):
    """Query and key tiles smaller than the selection block (the GPU's 64-row sub-tiles)."""
    check(1, 4, 2, 90, 32, 32, torch.float32, mean_correction=mean_correction, tile=tile)


@pytest.mark.parametrize("mean_correction", [False, True], ids=["plain", "mean_corr"])
def test_many_blocks_cross_mean_correction_chunks(mean_correction):
    """M = 19 > 16 blocks per mean-correction step: the kept-list window slides over chunks."""
    check(1, 2, 1, 300, 16, 16, torch.float32, density=0.3, mean_correction=mean_correction)


def test_dense_rows_span_three_mean_correction_chunks():
    """More kept entries than one window holds before the last chunk: the window must advance
    by the entries each chunk consumed, or kept blocks turn into pseudo-tokens."""
    check(1, 1, 1, 600, 16, 16, torch.float32, density=0.9, mean_correction=True)


@pytest.mark.parametrize("mean_correction", [False, True], ids=["plain", "mean_corr"])
def test_diagonal_not_kept(mean_correction):
    check(1, 2, 2, 120, 16, 16, torch.float32, mean_correction=mean_correction,
          keep_diagonal=False)


@pytest.mark.parametrize("B,H,Hkv,S,D,block_size", [(1, 4, 2, 77, 32, 16), (2, 2, 2, 64, 16, 32),
                                                    (1, 8, 2, 40, 64, 16)])
def test_all_blocks_kept_is_dense_sdpa(B, H, Hkv, S, D, block_size):
    """alpha = 0 selects every causal block: then the kernel is dense causal attention."""
    q, k, v = make_qkv(B, H, Hkv, S, D, torch.float32, seed=3)
    M = ku.cdiv(S, block_size)
    keep = torch.ones(M, M, dtype=torch.bool).tril().expand(B, H, M, M)
    num, idx = (t.to(DEVICE) for t in ku.compact_mask(keep))
    for mean_correction in (False, True):  # nothing skipped: no pseudo-tokens either
        got = block_sparse_attention(q, k, v, num, idx, 0.2, block_size,
                                     mean_correction=mean_correction)
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.2,
                                                  enable_gqa=H != Hkv)
        assert_close(got, expected, 2e-5, 2e-5)


def test_mean_correction_changes_the_output_and_uses_given_means():
    """The correction is really applied, and given kmean / vmean are the ones used."""
    B, H, Hkv, S, D, bs = 1, 2, 1, 96, 16, 16
    q, k, v = make_qkv(B, H, Hkv, S, D, torch.float32, seed=5)
    num, idx = random_selection(B, H, S, bs, 0.2, seed=5)
    plain = block_sparse_attention(q, k, v, num, idx, 0.25, bs)
    kmean, vmean, _ = key_block_stats(k, v, bs)
    given_means = block_sparse_attention(q, k, v, num, idx, 0.25, bs, mean_correction=True,
                                         kmean=kmean, vmean=vmean)
    computed = block_sparse_attention(q, k, v, num, idx, 0.25, bs, mean_correction=True)
    assert_close(given_means, computed, 1e-6, 1e-6)
    assert (given_means - plain).abs().max() > 1e-3
    shifted = block_sparse_attention(q, k, v, num, idx, 0.25, bs, mean_correction=True,
                                     kmean=kmean, vmean=vmean + 1.0)
    assert (shifted - given_means).abs().max() > 1e-3


def selection_past_diagonal(B, H, S, block_size, seed=7, device=DEVICE):
    """A compact selection whose rows also name blocks past the diagonal (j > i): random
    blocks on both sides, the diagonal kept in some rows and not in others, block 0 always."""
    M = ku.cdiv(S, block_size)
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, H, M, M, generator=g) < 0.5
    keep[..., 0] = True
    assert (keep & torch.ones(M, M, dtype=torch.bool).triu(1)).any()
    assert keep.diagonal(dim1=-2, dim2=-1)[..., 1:].any()
    assert not keep.diagonal(dim1=-2, dim2=-1).all()
    return tuple(t.to(device) for t in ku.compact_mask(keep))


@pytest.mark.parametrize("mean_correction", [False, True])
def test_entries_after_the_diagonal_are_ignored(mean_correction):
    """Kept lists may name blocks past the diagonal; like the reference, they add nothing."""
    B, H, S, bs = 1, 2, 80, 16
    q, k, v = make_qkv(B, H, H, S, 16, torch.float32, seed=7)
    num, idx = selection_past_diagonal(B, H, S, bs)
    got = block_sparse_attention(q, k, v, num, idx, 0.25, bs, mean_correction=mean_correction)
    expected = block_sparse_attention_reference(q, k, v, num, idx, 0.25, bs, mean_correction)
    assert_close(got, expected, 2e-5, 2e-5)


def test_strided_inputs_and_output():
    """Models hand over (B, S, H, D) tensors transposed to (B, H, S, D): no copies needed."""
    B, H, Hkv, S, D, bs = 2, 4, 2, 50, 32, 16
    q, k, v = make_qkv(B, H, Hkv, S, D, torch.float16, seed=9)
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qt.is_contiguous()
    num, idx = random_selection(B, H, S, bs, 0.5, seed=9)
    out = torch.full((B, S, H, D), float("nan"), dtype=q.dtype, device=q.device).transpose(1, 2)
    got = block_sparse_attention(qt, kt, vt, num, idx, 0.2, bs, out=out)
    expected = block_sparse_attention_reference(q, k, v, num, idx, 0.2, bs)
    assert_close(got, expected, *TOLERANCE[torch.float16])


def test_float64_is_refused_by_the_kernel_and_dispatched_to_the_reference():
    q, k, v = make_qkv(1, 2, 1, 40, 16, torch.float64, seed=11)
    num, idx = random_selection(1, 2, 40, 16, 0.5, seed=11)
    with pytest.raises(TypeError, match="float16/bfloat16/float32"):
        block_sparse_attention(q, k, v, num, idx, 0.3, 16)
    config = FlashPrefillConfig(block_size=16, kernel="triton", mean_correction=True)
    got = dispatch.sparse(q, k, v, 0.3, config, num, idx)
    assert got.dtype == torch.float64
    assert_close(got, block_sparse_attention_reference(q, k, v, num, idx, 0.3, 16, True),
                 1e-12, 1e-12)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), groups=st.sampled_from([1, 2, 4]),
       S=st.integers(1, 150), D=st.sampled_from([16, 24, 40, 64]),
       block_size=st.sampled_from([16, 32]), density=st.floats(0.0, 1.0),
       mean_correction=st.booleans(), seed=st.integers(0, 2 ** 16))
@example(B=1, Hkv=1, groups=1, S=1, D=16, block_size=16, density=0.0, mean_correction=True,
         seed=0)
@example(B=1, Hkv=1, groups=4, S=33, D=24, block_size=32, density=0.0, mean_correction=True,
         seed=1)
def test_property_matches_reference(B, Hkv, groups, S, D, block_size, density,
                                    mean_correction, seed):
    check(B, Hkv * groups, Hkv, S, D, block_size, torch.float32, density=density,
          mean_correction=mean_correction, seed=seed)


@pytest.mark.parametrize("elt_bytes", [2, 4])
@pytest.mark.parametrize("head_dim_p2", [16, 64, 128, 256])
@pytest.mark.parametrize("block_size", [16, 32, 64, 128, 256])
def test_gpu_configs_fit_the_selection_block(block_size, head_dim_p2, elt_bytes):
    tiles = _gpu_tiles(block_size, head_dim_p2, elt_bytes)
    assert tiles
    for bm, bn, warps, stages in tiles:
        assert block_size % bm == 0 and block_size % bn == 0 and bm >= 16 and bn >= 16
        assert warps in (4, 8) and stages >= 2


# ----------------------------------------------------------------------------------- GPU


def structured_selection(B, H, S, block_size, density, seed=0):
    """A FlashPrefill-like selection: sinks, a local window, random blocks, dense last rows."""
    M = ku.cdiv(S, block_size)
    g = torch.Generator().manual_seed(seed)
    i = torch.arange(M)[:, None]
    j = torch.arange(M)[None, :]
    keep = (torch.rand(B, H, M, M, generator=g) < density) | (j < 2) | (j > i - 4) | (i >= M - 2)
    keep &= j <= i
    return tuple(t.to("cuda") for t in ku.compact_mask(keep))


@gpu
@pytest.mark.parametrize("mean_correction", [False, True], ids=["plain", "mean_corr"])
@pytest.mark.parametrize("S", [4096, 5000, 16384])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_bf16_long(S, D, mean_correction):
    B, H, Hkv, bs = 1, 8, 2, 128
    q, k, v = make_qkv(B, H, Hkv, S, D, torch.bfloat16, seed=S + D)
    num, idx = structured_selection(B, H, S, bs, 0.05, seed=S)
    scale = D ** -0.5
    got = block_sparse_attention(q, k, v, num, idx, scale, bs, mean_correction=mean_correction,
                                 out=poisoned_like(q))
    assert torch.isfinite(got).all()
    expected = block_sparse_attention_reference(q, k, v, num, idx, scale, bs, mean_correction)
    assert rel_l2(got, expected) <= 1e-2


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [80, 96, 256])
def test_gpu_dtypes_and_head_dims(dtype, D):
    B, H, Hkv, S, bs = 2, 4, 2, 2000, 128
    q, k, v = make_qkv(B, H, Hkv, S, D, dtype, seed=D)
    num, idx = structured_selection(B, H, S, bs, 0.2, seed=D)
    got = block_sparse_attention(q, k, v, num, idx, D ** -0.5, bs, mean_correction=True,
                                 out=poisoned_like(q))
    assert torch.isfinite(got).all()
    expected = block_sparse_attention_reference(q, k, v, num, idx, D ** -0.5, bs, True)
    assert rel_l2(got, expected) <= (1e-2 if dtype == torch.bfloat16 else 3e-3)


@gpu
@pytest.mark.parametrize("S", [4096, 8191])
def test_gpu_all_causal_blocks_is_sdpa(S):
    """alpha = 0 keeps every causal block: the kernel must equal dense causal SDPA."""
    B, H, Hkv, D, bs = 1, 8, 2, 128, 128
    q, k, v = make_qkv(B, H, Hkv, S, D, torch.bfloat16, seed=S)
    M = ku.cdiv(S, bs)
    keep = torch.ones(M, M, dtype=torch.bool).tril().expand(B, H, M, M)
    num, idx = (t.cuda() for t in ku.compact_mask(keep))
    got = block_sparse_attention(q, k, v, num, idx, D ** -0.5, bs)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.isfinite(got).all()
    assert rel_l2(got, expected) <= 1e-2


@gpu
@pytest.mark.parametrize("dtype,D,tile", [
    (dtype, D, tile) for dtype in (torch.bfloat16, torch.float32) for D in (128, 256)
    for tile in _gpu_tiles(128, D, torch.tensor([], dtype=dtype).element_size())])
def test_gpu_every_config_matches(dtype, D, tile):
    """Each autotuning candidate compiles, fits in shared memory and is right."""
    B, H, Hkv, S, bs = 1, 4, 2, 3000, 128
    q, k, v = make_qkv(B, H, Hkv, S, D, dtype, seed=1)
    num, idx = structured_selection(B, H, S, bs, 0.1, seed=1)
    got = block_sparse_attention(q, k, v, num, idx, D ** -0.5, bs, mean_correction=True,
                                 tile=tile, out=poisoned_like(q))
    expected = block_sparse_attention_reference(q, k, v, num, idx, D ** -0.5, bs, True)
    assert torch.isfinite(got).all()
    assert rel_l2(got, expected) <= (1e-2 if dtype == torch.bfloat16 else 3e-3)


@gpu
def test_gpu_torch_compile_and_cuda_graph():
    """Launches through wrap_triton: compiles with dynamic shapes and replays in a CUDA graph."""
    B, H, Hkv, D, bs = 1, 4, 2, 64, 128
    compiled = torch.compile(
        lambda q, k, v, n, i: block_sparse_attention(q, k, v, n, i, 0.125, bs),
        fullgraph=True, dynamic=True)
    for S in (1500, 2100):
        q, k, v = make_qkv(B, H, Hkv, S, D, torch.bfloat16, seed=S)
        num, idx = structured_selection(B, H, S, bs, 0.1, seed=S)
        expected = block_sparse_attention_reference(q, k, v, num, idx, 0.125, bs)
        assert rel_l2(compiled(q, k, v, num, idx), expected) <= 1e-2

    out = poisoned_like(q)
    block_sparse_attention(q, k, v, num, idx, 0.125, bs, out=out)  # warm-up (autotune)
    graph = torch.cuda.CUDAGraph()
    out.fill_(float("nan"))
    with torch.cuda.graph(graph):
        block_sparse_attention(q, k, v, num, idx, 0.125, bs, out=out)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_l2(out, expected) <= 1e-2


@pytest.mark.parametrize("mean_correction", [False, True], ids=["plain", "mean_corr"])
@pytest.mark.parametrize("blocks", [(0, 3), (3, 7), (6, 7), (2, 5)])
def test_a_chunk_of_query_blocks_equals_those_rows_of_the_whole_call(blocks, mean_correction):
    # the dispatch attends long prompts a chunk of query blocks at a time (q_start)
    B, H, Hkv, S, D, bs = 2, 4, 2, 100, 16, 16
    q, k, v = make_qkv(B, H, Hkv, S, D, torch.float32, seed=4)
    num, idx = random_selection(B, H, S, bs, 0.4, seed=4)
    whole = block_sparse_attention_reference(q, k, v, num, idx, 0.25, bs, mean_correction)
    i0, i1 = blocks
    r0, r1 = i0 * bs, min(S, i1 * bs)
    qc, nc, ic = q[:, :, r0:r1], num[:, :, i0:i1], idx[:, :, i0:i1]
    out = poisoned_like(qc)
    got = block_sparse_attention(qc, k, v, nc, ic, 0.25, bs, mean_correction=mean_correction,
                                 out=out, q_start=r0)
    assert got is out and got.shape == (B, H, r1 - r0, D)
    assert_close(got, whole[:, :, r0:r1], *TOLERANCE[torch.float32])
    ref = block_sparse_attention_reference(qc, k, v, nc, ic, 0.25, bs, mean_correction,
                                           q_start=r0)
    assert_close(ref, whole[:, :, r0:r1], 1e-6, 1e-6)


@pytest.mark.parametrize("q_start", [8, 96])
def test_a_chunk_must_start_on_a_block_and_fit_the_keys(q_start):
    q, k, v = make_qkv(1, 2, 2, 32, 16, torch.float32)
    num, idx = random_selection(1, 2, 32, 16, 0.5)
    with pytest.raises(ValueError, match="q_start"):
        block_sparse_attention(q, k, v, num, idx, 0.25, 16, q_start=q_start)
