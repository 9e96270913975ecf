"""The mass guard of the pattern search: the Triton kernel (interpreter on CPU) against the
plain-torch reference, and the guard's promise: no row keeps less estimated mass than the floor."""

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fp_compile.demo.synthetic import planted_qkv
from fp_compile.kernels import utils as ku
from fp_compile.kernels.block_means import key_block_means
from fp_compile.kernels.pattern_search import (block_scores_reference, guard_rungs,
                                               pattern_search, pattern_search_reference,
                                               select_mask_reference)
from tests.helpers import DEVICE, assert_close, gpu


@pytest.mark.parametrize("strength,floor,shared", [(0.5, 0.9, False), (1.0, 0.95, True),
                                                   (2.0, 0.95, False)])
def test_kernel_and_reference_take_the_same_guarded_decisions(strength, floor, shared):
    q, k, _ = planted_qkv(1, 4, 2, 600, 32, seed=1, strength=strength, device=DEVICE)
    args = (q, k, 1 / math.sqrt(32), 16, 0.12, 2, 4, 2)
    num, idx, mass = pattern_search(*args, gqa_shared=shared, mass_floor=floor,
                                    return_mass=True)
    rnum, ridx, rmass = pattern_search_reference(*args, gqa_shared=shared, mass_floor=floor,
                                                 return_mass=True)
    assert torch.equal(num, rnum) and torch.equal(idx, ridx)
    assert_close(mass, rmass, 1e-5, 1e-5, "estimated kept mass")
    paper = pattern_search_reference(*args, gqa_shared=shared)[0]
    assert num.sum() > paper.sum(), "the guard should have added blocks on these inputs"
    assert (num >= paper).all(), "the guard only ever adds blocks"


def test_mass_path_leaves_the_paper_selection_bit_for_bit():
    q, k, _ = planted_qkv(2, 2, 1, 300, 32, seed=3, device=DEVICE)
    args = (q, k, 1 / math.sqrt(32), 16, 0.12, 2, 4, 2)
    plain = pattern_search(*args)
    num, idx, mass = pattern_search(*args, mass_floor=0.0, return_mass=True)
    assert torch.equal(plain[0], num) and torch.equal(plain[1], idx)
    assert ((mass > 0) & (mass <= 1 + 1e-6)).all()


def _recomputed_mass(q, k, keep, scale, block_size, last_dense):
    """Kept share of each row's normalised block scores, from scratch: (B, H, M), NaN for rows
    with nothing scored or dense rows (no promise there)."""
    M = keep.shape[-1]
    scores = block_scores_reference(q, key_block_means(k, block_size), scale, block_size, 0, M)
    i = torch.arange(M)[:, None]
    before = torch.arange(M)[None, :] < i
    total = (scores * before).sum(-1)
    kept = (scores * (keep & before)).sum(-1)
    share = kept / total
    share[..., M - last_dense:] = float("nan")
    return share.masked_fill(total <= 0, float("nan"))


@settings(max_examples=25, deadline=None)
@given(S=st.integers(17, 600), heads=st.sampled_from([(2, 1), (4, 2), (4, 4)]),
       block=st.sampled_from([16, 32]), alpha=st.sampled_from([0.05, 0.12, 0.3, 0.9]),
       floor=st.floats(0.05, 0.999), strength=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
       last=st.integers(0, 2), seed=st.integers(0, 2 ** 16))
@example(S=600, heads=(4, 2), block=16, alpha=0.9, floor=0.999, strength=2.0, last=0, seed=0)
def test_kept_estimated_mass_never_ends_below_the_floor(S, heads, block, alpha, floor, strength,
                                                        last, seed):
    H, Hkv = heads
    q, k, _ = planted_qkv(1, H, Hkv, S, 16, seed=seed, strength=strength)
    scale = 0.25
    keep, mass = select_mask_reference(q, k, scale, block, alpha, 1, 1, last, mass_floor=floor,
                                       return_mass=True)
    share = _recomputed_mass(q, k, keep, scale, block, last)
    scored = ~share.isnan()
    assert (share[scored] >= floor - 1e-5).all(), float(share[scored].min())
    assert_close(mass[scored], share[scored], 1e-5, 1e-5, "reported kept mass")
    # and it is the first rung that reaches the floor: the rung above it did not
    paper = select_mask_reference(q, k, scale, block, alpha, 1, 1, last)
    assert (keep | ~paper).all(), "the guard never drops a block the paper keeps"


def test_ladder_ends_with_every_causal_block():
    rungs = guard_rungs(0.12)
    assert rungs[0] == 0.12 and rungs[-1] == 0.0
    assert all(a > b for a, b in zip(rungs, rungs[1:]))
    # a floor of (almost) 1 reaches the last rung wherever the estimate is spread out
    q, k, _ = planted_qkv(1, 2, 1, 256, 16, seed=0, strength=0.0)
    keep = select_mask_reference(q, k, 0.25, 16, 0.9, 0, 1, 0, mass_floor=0.999999)
    M = keep.shape[-1]
    causal = torch.ones(M, M, dtype=torch.bool).tril()
    assert torch.equal(keep[0, 0], causal)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_guard_matches_reference(dtype):
    q, k, _ = planted_qkv(1, 8, 2, 8192, 128, seed=5, strength=0.75, dtype=dtype, device="cuda")
    args = (q, k, 1 / math.sqrt(128), 128, 0.12, 2, 4, 2)
    num, idx, mass = pattern_search(*args, mass_floor=0.95, return_mass=True)
    rnum, ridx, rmass = pattern_search_reference(*args, mass_floor=0.95, return_mass=True)
    keep, rkeep = ku.expand_indices(num, idx), ku.expand_indices(rnum, ridx)
    M = ku.cdiv(8192, 128)
    # rounding can move a row across the floor: allow a few rows to take another rung
    assert (keep != rkeep).any(-1).float().mean() < 0.01
    assert (num.sum() - rnum.sum()).abs() / rnum.sum() < 0.01
    assert_close(mass[num == rnum], rmass[num == rnum], 1e-3, 1e-3, "kept mass")
    assert num.sum() / (num.numel() * (M + 1) / 2) < 1.0
