"""The FP8 block-sparse attention: its reference against exact attention (CPU), the Triton
kernel against its reference (CPU: Triton's interpreter, which runs e4m3 loads, casts and
dots; GPU-marked: bf16 inputs, the GPU launch config, longer sequences)."""

import math

import pytest
import torch

from fp_compile.accuracy import rel_l2
from fp_compile.kernels.block_sparse_attention import block_sparse_attention_reference
from fp_compile.kernels.block_sparse_attention_fp8 import (FP8_TILES, block_sparse_attention_fp8,
                                                           block_sparse_attention_fp8_reference)
from fp_compile.kernels.fp8_quant import quantize_blocks, quantize_blocks_reference
from tests.helpers import DEVICE, assert_close, gpu
from tests.kernels.test_block_sparse_attention import (make_qkv, random_selection,
                                                       selection_past_diagonal)

# e4m3 keeps 3 mantissa bits: q, k, v and p each carry up to 2^-4 relative rounding error.
# Relative L2 of the reference vs exact attention on make_qkv's inputs (measured 0.03 at
# S <= 160): bound 0.06. Kernel vs reference: p rounded against the running max, not the
# final one, and fp32 summation order (measured rel L2 <= 0.005, max abs 0.026): bounds below.
REF_VS_EXACT = 0.06
KERNEL_REL_L2, KERNEL_ATOL, KERNEL_RTOL = 0.01, 0.06, 0.06


def quantised(q, k, v, bs, triton=True):
    quant = quantize_blocks if triton else quantize_blocks_reference
    return quant(q, bs), quant(k, bs), quant(v, bs, transpose=True)


def check(B, H, Hkv, S, D, bs, dtype=torch.float16, density=0.4, seed=0, keep_diagonal=True,
          tile=None):
    q, k, v = make_qkv(B, H, Hkv, S, D, dtype, seed)
    num, idx = random_selection(B, H, S, bs, density, seed, keep_diagonal=keep_diagonal)
    scale = 1.0 / math.sqrt(D)
    q8, k8, v8 = quantised(q, k, v, bs)
    out = torch.full_like(q, float("nan"))
    got = block_sparse_attention_fp8(q8, k8, v8, num, idx, scale, bs, out, tile=tile)
    want = block_sparse_attention_fp8_reference(q8, k8, v8, num, idx, scale, bs, q.dtype)
    # NaN exactly where the reference has it (rows that keep no block): nothing left unwritten
    assert got is out and torch.equal(got.isnan(), want.isnan())
    assert_close(got.nan_to_num(), want.nan_to_num(), KERNEL_ATOL, KERNEL_RTOL)
    assert rel_l2(got.nan_to_num(), want.nan_to_num()) < KERNEL_REL_L2


def test_reference_close_to_exact_attention():
    B, H, Hkv, S, D, bs = 1, 4, 2, 160, 64, 32
    q, k, v = make_qkv(B, H, Hkv, S, D, torch.bfloat16, device="cpu")
    num, idx = random_selection(B, H, S, bs, 0.5, device="cpu")
    scale = 1.0 / math.sqrt(D)
    got = block_sparse_attention_fp8_reference(*quantised(q, k, v, bs, triton=False), num, idx,
                                               scale, bs, q.dtype)
    exact = block_sparse_attention_reference(q.float(), k.float(), v.float(), num, idx, scale,
                                             bs)
    assert got.dtype == torch.bfloat16
    err = rel_l2(got, exact)
    assert 0 < err < REF_VS_EXACT, err


def test_reference_q_start_is_a_slice_of_the_whole():
    """Queries from q_start on (a chunk) give the rows of the whole call."""
    B, H, S, D, bs = 1, 2, 128, 32, 32
    q, k, v = make_qkv(B, H, 1, S, D, torch.float16, device="cpu")
    num, idx = random_selection(B, H, S, bs, 0.5, device="cpu")
    q8, k8, v8 = quantised(q, k, v, bs, triton=False)
    whole = block_sparse_attention_fp8_reference(q8, k8, v8, num, idx, 0.2, bs, q.dtype)
    q8c = quantize_blocks_reference(q[:, :, 64:], bs)
    part = block_sparse_attention_fp8_reference(q8c, k8, v8, num[..., 2:], idx[:, :, 2:], 0.2,
                                                bs, q.dtype, q_start=64)
    assert torch.equal(part, whole[:, :, 64:])


# (B, H, Hkv, S, D, bs): partial last block, GQA 1/2/4, D padded (24), one block, batch 2.
CASES = [(1, 2, 1, 100, 32, 32), (2, 4, 2, 64, 24, 32), (1, 4, 1, 75, 16, 32),
         (1, 2, 2, 32, 32, 32), (1, 2, 2, 160, 64, 64)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_H{}_Hkv{}_S{}_D{}_bs{}".format(*c))
def test_kernel_matches_reference(case):
    check(*case)


def test_kernel_diagonal_not_kept():
    check(1, 2, 1, 100, 32, 32, keep_diagonal=False)


def test_kernel_entries_after_the_diagonal_are_ignored():
    B, H, S, D, bs = 1, 2, 128, 32, 32
    q, k, v = make_qkv(B, H, 1, S, D, torch.float16, seed=7)
    num, idx = selection_past_diagonal(B, H, S, bs)
    q8, k8, v8 = quantised(q, k, v, bs)
    got = block_sparse_attention_fp8(q8, k8, v8, num, idx, 0.2, bs, torch.full_like(q, 7.0))
    want = block_sparse_attention_fp8_reference(q8, k8, v8, num, idx, 0.2, bs, q.dtype)
    assert_close(got, want, KERNEL_ATOL, KERNEL_RTOL)


def test_kernel_sub_tiles_of_a_selection_block():
    """16-row tiles in 32-row blocks: the diagonal's unmasked and masked sub-tiles."""
    check(1, 2, 1, 90, 32, 32, tile=(16, 16, 4, 1))


def test_kernel_q_start_writes_its_rows():
    B, H, S, D, bs = 1, 2, 128, 32, 32
    q, k, v = make_qkv(B, H, 1, S, D, torch.float16)
    num, idx = random_selection(B, H, S, bs, 0.5)
    q8, k8, v8 = quantised(q, k, v, bs)
    out = torch.full_like(q, float("nan"))
    q8c = quantize_blocks(q[:, :, 64:], bs)
    block_sparse_attention_fp8(q8c, k8, v8, num[..., 2:], idx[:, :, 2:], 0.2, bs,
                               out[:, :, 64:], q_start=64)
    assert out[:, :, :64].isnan().all()
    want = block_sparse_attention_fp8_reference(q8, k8, v8, num, idx, 0.2, bs, q.dtype)
    assert_close(out[:, :, 64:], want[:, :, 64:], KERNEL_ATOL, KERNEL_RTOL)


@gpu
@pytest.mark.parametrize("bs", sorted(FP8_TILES))
@pytest.mark.parametrize("S,D", [(4096, 128), (3000, 64)], ids=["4k_d128", "3000_d64"])
def test_gpu_kernel_matches_reference(S, D, bs):
    """The GPU launch config of each block size, bf16 inputs, GQA 4."""
    check(1, 8, 2, S, D, bs, dtype=torch.bfloat16, density=0.3)
    assert DEVICE == "cuda"
