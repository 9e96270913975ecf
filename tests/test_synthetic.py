"""planted_qkv: shapes, determinism, and the planted structure really shapes the attention."""

import math

import pytest
import torch

from fp_compile.kernels.pattern_search import select_mask_reference
from fp_compile.demo.synthetic import planted_qkv, planted_qkv_with_info


@pytest.mark.parametrize("B,H,Hkv,S,D", [(1, 4, 2, 100, 32), (2, 8, 8, 257, 64), (1, 3, 1, 1, 16)])
def test_shapes_dtype_and_finite(B, H, Hkv, S, D):
    q, k, v = planted_qkv(B, H, Hkv, S, D, seed=3, dtype=torch.float16)
    assert q.shape == (B, H, S, D) and k.shape == v.shape == (B, Hkv, S, D)
    assert q.dtype == k.dtype == v.dtype == torch.float16
    assert all(t.isfinite().all() for t in (q, k, v))


def test_deterministic_per_seed():
    a = planted_qkv(1, 4, 2, 300, 32, seed=5)
    b = planted_qkv(1, 4, 2, 300, 32, seed=5)
    c = planted_qkv(1, 4, 2, 300, 32, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[1], c[1])


def test_rejects_bad_heads():
    with pytest.raises(ValueError, match="multiple"):
        planted_qkv(1, 6, 4, 64, 32)


def _probs(q, k, row, D):
    """Exact causal softmax of query ``row`` for every head: (H, row + 1)."""
    kk = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = torch.einsum("hd,hsd->hs", q[0, :, row], kk[0, :, : row + 1])
    return torch.softmax(logits / math.sqrt(D), dim=-1)


def test_structure_present():
    S, D = 4096, 64
    q, k, v, info = planted_qkv_with_info(1, 4, 1, S, D, seed=0)
    rows = range(S - 640, S, 20)
    sink, col, band = [], [], []
    cols = info["columns"][0, 0]
    o = info["offsets"][0]
    for row in rows:
        p = _probs(q, k, row, D)
        sink.append(p[:, 0])
        col.append(p[1, cols[cols <= row]].mean() * row)       # vs uniform 1 / row
        band.append(p[2, row - o - 3: row - o + 4].sum() * row / 7)
    sink = torch.stack(sink)
    # sink: token 0 takes a large share in every head
    assert (sink.mean(dim=0) > 0.2).all(), sink.mean(dim=0)
    # vertical head (1): planted columns hold far more than a uniform share
    assert torch.stack(col).mean() > 10
    # slash head (2): the band around row - offset beats uniform by a wide margin
    assert torch.stack(band).mean() > 3
    # uniform random q/k would give density near 1; planted structure makes it sparse
    keep = select_mask_reference(q, k, 1 / math.sqrt(D), 128, 0.12, 2, 4, 2)
    M = keep.shape[-1]
    assert keep.sum().item() / (keep[..., 0].numel() * (M + 1) / 2) < 0.6


def test_density_falls_with_length():
    dens = []
    for S in (1024, 4096):
        q, k, _ = planted_qkv(1, 2, 1, S, 32, seed=1)
        keep = select_mask_reference(q, k, 1 / math.sqrt(32), 64, 0.12, 2, 4, 2)
        M = keep.shape[-1]
        dens.append(keep.sum().item() / (2 * M * (M + 1) / 2))
    assert dens[1] < dens[0]


def test_strength_zero_is_plain_noise():
    q, k, _ = planted_qkv(1, 2, 1, 256, 32, seed=0, strength=0.0)
    p = _probs(q, k, 255, 32)
    assert p.max() < 0.05
