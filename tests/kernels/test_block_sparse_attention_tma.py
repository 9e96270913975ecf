"""The attention variants (block_sparse_attention_tma) against the reference and the existing
kernel.

CPU: Triton's interpreter runs every variant, the TMA ones included (it reads host tensor
descriptors; warp specialisation is a no-op there), fp32 / fp16 at small shapes. GPU-marked:
the realistic shape (S = 8192, H = 32, Hkv = 8, D = 128, bf16) against the existing kernel.
"""

import functools
import math

import pytest
import torch

from fp_compile.accuracy import rel_l2
from fp_compile.kernels import block_sparse_attention_tma as bt
from fp_compile.kernels.block_sparse_attention import (block_sparse_attention,
                                                       block_sparse_attention_reference)
from tests.helpers import assert_close, gpu
from tests.kernels.test_block_sparse_attention import (TOLERANCE, make_qkv, poisoned_like,
                                                       random_selection, selection_past_diagonal)

VARIANTS = sorted(bt.VARIANTS)


def check(variant, B, H, Hkv, S, D, block_size, dtype, density=0.4, tile=None, seed=0,
          keep_diagonal=True, q_mul=1.0):
    q, k, v = make_qkv(B, H, Hkv, S, D, dtype, seed)
    q = q * q_mul
    num, idx = random_selection(B, H, S, block_size, density, seed, keep_diagonal=keep_diagonal)
    scale = 1.0 / math.sqrt(D)
    out = poisoned_like(q)
    got = bt.block_sparse_attention_variant(q, k, v, num, idx, scale, block_size,
                                            variant=variant, tile=tile, out=out)
    assert got is out and got.dtype == q.dtype
    expected = block_sparse_attention_reference(q, k, v, num, idx, scale, block_size)
    # Rows with no visible kept key are NaN in both (0 / 0); every other element is written.
    assert torch.equal(got.isnan(), expected.isnan()), "some output elements were not written"
    atol, rtol = TOLERANCE[dtype]
    assert_close(got.nan_to_num(), expected.nan_to_num(), atol, rtol)


# (B, H, Hkv, S, D, block_size, dtype): partial last block, GQA 1/2/4, D not a power of two.
CASES = [
    (1, 4, 2, 100, 16, 16, torch.float32),
    (2, 2, 2, 64, 32, 32, torch.float32),
    (1, 4, 1, 75, 24, 32, torch.float16),
    (1, 2, 1, 13, 32, 16, torch.float16),   # S < block
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_H{}_Hkv{}_S{}_D{}_bs{}_{}".format(
    *c[:6], str(c[6]).split(".")[-1]))
def test_matches_reference(variant, case):
    check(variant, *case)


@pytest.mark.parametrize("variant", ["ptr_fold", "tma_fold"])
@pytest.mark.parametrize("density", [0.15, 0.9])
def test_large_logits_and_densities(variant, density):
    """Logits of tens of units: row maxima move by many powers of two across key tiles."""
    check(variant, 1, 2, 1, 200, 32, 16, torch.float32, density=density, q_mul=20.0)


@pytest.mark.parametrize("variant", ["ptr", "tma_fold"])
@pytest.mark.parametrize("tile", [(16, 16, 4, 1), (32, 16, 4, 1), (16, 32, 4, 1)],
                         ids=lambda t: f"BM{t[0]}_BN{t[1]}")
def test_sub_tiles_of_a_selection_block(variant, tile):
    check(variant, 1, 4, 2, 90, 32, 32, torch.float32, tile=tile)


@pytest.mark.parametrize("variant", ["ptr_fold", "tma"])
def test_diagonal_not_kept(variant):
    check(variant, 1, 2, 2, 120, 16, 16, torch.float32, keep_diagonal=False)


@pytest.mark.parametrize("variant", ["ptr_fold", "tma_fold"])
def test_entries_after_the_diagonal_are_ignored(variant):
    """Rows naming blocks past the diagonal (with and without the diagonal itself): those
    blocks add nothing, as in the reference."""
    B, H, S, D, bs = 1, 2, 96, 16, 16
    q, k, v = make_qkv(B, H, 1, S, D, torch.float32, seed=7)
    num, idx = selection_past_diagonal(B, H, S, bs)
    got = bt.block_sparse_attention_variant(q, k, v, num, idx, 0.25, bs, variant=variant,
                                            out=poisoned_like(q))
    assert_close(got, block_sparse_attention_reference(q, k, v, num, idx, 0.25, bs), 2e-5, 2e-5)


def test_q_start():
    """Queries of the second half only, against the same rows of a full call."""
    B, H, Hkv, S, D, bs = 1, 2, 1, 128, 16, 16
    q, k, v = make_qkv(B, H, Hkv, S, D, torch.float32)
    num, idx = random_selection(B, H, S, bs, 0.5)
    full = block_sparse_attention_reference(q, k, v, num, idx, 0.25, bs)
    half = S // 2
    for variant in ("ptr", "tma"):
        got = bt.block_sparse_attention_variant(q[:, :, half:], k, v, num[:, :, half // bs:],
                                                idx[:, :, half // bs:], 0.25, bs,
                                                variant=variant, q_start=half)
        assert_close(got, full[:, :, half:], 2e-5, 2e-5)


def test_other_options_go_to_the_existing_kernel():
    q, k, v = make_qkv(1, 2, 1, 64, 16, torch.float32)
    num, idx = random_selection(1, 2, 64, 16, 0.5)
    got = bt.block_sparse_attention_variant(q, k, v, num, idx, 0.25, 16, variant="tma",
                                            mean_correction=True)
    expected = block_sparse_attention(q, k, v, num, idx, 0.25, 16, mean_correction=True)
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="unknown variant"):
        bt.block_sparse_attention_variant(q, k, v, num, idx, 0.25, 16, variant="nope")


def test_tma_reads_through_pointers_while_tracing_or_on_unviewable_kv(monkeypatch):
    """Host descriptors are for eager launches: while tracing (and for k / v that are no 2-D
    row view) a TMA variant runs its pointer twin ("tma_fold" as "ptr_fold"), launched through
    ``launcher`` (wrap_triton while tracing), not the existing kernel; same output."""
    monkeypatch.setattr(bt, "block_sparse_attention", None)    # would raise if called
    launched = []
    monkeypatch.setattr(bt, "launcher", lambda kernel: launched.append(1) or kernel)
    q, k, v = make_qkv(1, 4, 2, 64, 16, torch.float32)
    num, idx = random_selection(1, 4, 64, 16, 0.5)
    want = block_sparse_attention_reference(q, k, v, num, idx, 0.25, 16)
    # (B, S, Hkv, D) memory: a head's rows are Hkv rows apart, no (B * Hkv * S, D) view.
    k_strided = k.transpose(1, 2).contiguous().transpose(1, 2)
    assert bt.tma_supported(k, v) and not bt.tma_supported(k_strided, v)
    got = bt.block_sparse_attention_variant(q, k_strided, v, num, idx, 0.25, 16,
                                            variant="tma_fold")
    assert launched == [1]
    assert_close(got, want, 1e-5, 1e-5)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    got = bt.block_sparse_attention_variant(q, k, v, num, idx, 0.25, 16, variant="tma")
    assert launched == [1, 1]
    assert_close(got, want, 1e-5, 1e-5)


@functools.lru_cache(maxsize=1)
def _realistic(S=8192):
    from fp_compile import FlashPrefillConfig, select_blocks
    from fp_compile.demo.synthetic import planted_qkv

    q, k, v = planted_qkv(1, 32, 8, S, 128, seed=0, dtype=torch.bfloat16, device="cuda")
    cfg = FlashPrefillConfig()
    sel = select_blocks(q, k, config=cfg)
    return q, k, v, sel.kv_num_blocks, sel.kv_indices, cfg.block_size


GPU_VARIANTS = sorted(VARIANTS)


@gpu
@pytest.mark.parametrize("variant", GPU_VARIANTS)
@pytest.mark.parametrize("tile", [None, (128, 64, 8, 3)], ids=["fixed", "BN64"])
def test_gpu_realistic_matches_existing_kernel(variant, tile):
    q, k, v, num, idx, bs = _realistic()
    scale = q.shape[-1] ** -0.5
    expected = block_sparse_attention(q, k, v, num, idx, scale, bs)
    got = bt.block_sparse_attention_variant(q, k, v, num, idx, scale, bs, variant=variant,
                                            tile=tile, out=poisoned_like(q))
    assert torch.isfinite(got).all()
    assert rel_l2(got, expected) < 1e-3


@gpu
@pytest.mark.parametrize("variant", ["tma", "tma_fold"])
def test_gpu_partial_last_block_and_head_dims(variant):
    """S not a multiple of the block (TMA reads the next head's rows past S: masked) and
    D = 64 / 80 (descriptor columns past D zero-filled)."""
    for S, D in ((5000, 128), (3000, 64), (2100, 80)):
        q, k, v = make_qkv(2, 8, 2, S, D, torch.bfloat16, seed=S, device="cuda")
        num, idx = random_selection(2, 8, S, 128, 0.3, seed=S, device="cuda")
        got = bt.block_sparse_attention_variant(q, k, v, num, idx, D ** -0.5, 128,
                                                variant=variant, out=poisoned_like(q))
        expected = block_sparse_attention_reference(q, k, v, num, idx, D ** -0.5, 128)
        assert torch.isfinite(got).all()
        assert rel_l2(got, expected) < 1e-2
