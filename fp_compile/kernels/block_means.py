"""Triton: the mean key (and value) of every key block, padding excluded, + its reference.

FlashPrefill scores query rows against one summary key per key block; mean correction also
needs the mean value. One program per (key block, batch * kv head) reads the block once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .utils import Span, acc_dtype, cdiv, check_kernel_dtype, launcher


@triton.jit
def _block_means_kernel(k_ptr, v_ptr, kmean_ptr, vmean_ptr, ks_ptr, ke_ptr,
                        skb, skh, sks, skd, svb, svh, svs, svd,
                        S, M, Hkv,
                        BLOCK: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                        ROWS: tl.constexpr, HAS_V: tl.constexpr, SPAN: tl.constexpr):
    """One program per (key block j, batch * kv head): fp32 means over the block's real rows.

    SPAN: only the valid keys ks[b] <= row < ke[b] count (read here, never on the host); a
    block without one gets mean 0.
    """
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    h = (bh % Hkv).to(tl.int64)
    d = tl.arange(0, DP)
    d_ok = d < D
    if SPAN:
        key_lo = tl.load(ks_ptr + b)
        key_hi = tl.minimum(tl.load(ke_ptr + b), S)
    # Row chunks accumulate elementwise; the rows are summed once at the end. (A sum over rows
    # per chunk crossed warps through shared memory every chunk, with bank conflicts: the
    # kernel was bound by L1 wavefronts at 35% of DRAM bandwidth, ncu in RESULTS.md run 57;
    # summing once took it from 168 to 88 us at 128K, run 58.)
    k_acc = tl.zeros([ROWS, DP], dtype=tl.float32)
    v_acc = tl.zeros([ROWS, DP], dtype=tl.float32)
    for r0 in tl.static_range(0, BLOCK, ROWS):
        rows = j * BLOCK + r0 + tl.arange(0, ROWS)
        row_ok = rows < S
        if SPAN:
            row_ok = (rows >= key_lo) & (rows < key_hi)
        msk = row_ok[:, None] & d_ok[None, :]
        kt = tl.load(k_ptr + b * skb + h * skh + rows[:, None].to(tl.int64) * sks
                     + d[None, :] * skd, mask=msk, other=0.0)
        k_acc += kt.to(tl.float32)
        if HAS_V:
            vt = tl.load(v_ptr + b * svb + h * svh + rows[:, None].to(tl.int64) * svs
                         + d[None, :] * svd, mask=msk, other=0.0)
            v_acc += vt.to(tl.float32)
    k_sum = tl.sum(k_acc, axis=0)
    v_sum = tl.sum(v_acc, axis=0)
    count = tl.minimum(S - j * BLOCK, BLOCK).to(tl.float32)
    if SPAN:
        valid = tl.minimum(key_hi, j * BLOCK + BLOCK) - tl.maximum(key_lo, j * BLOCK)
        count = tl.maximum(valid, 1).to(tl.float32)
    out = (bh.to(tl.int64) * M + j) * D + d
    tl.store(kmean_ptr + out, (k_sum / count).to(kmean_ptr.dtype.element_ty), mask=d_ok)
    if HAS_V:
        tl.store(vmean_ptr + out, (v_sum / count).to(vmean_ptr.dtype.element_ty), mask=d_ok)


def block_means(k: torch.Tensor, block_size: int, v: torch.Tensor | None = None, *,
                out_dtype: torch.dtype = torch.float32, span: Span | None = None):
    """Mean key (and value) of every key block, padding excluded.

    k, v: (B, Hkv, S, D), any strides, fp16/bf16/fp32. Returns kmean (B, Hkv, M, D), or
    (kmean, vmean) when v is given; M = ceil(S / block_size). Sums are fp32; the means are
    stored (rounded once) in ``out_dtype``. span: only the valid keys ks[b] <= j < ke[b] of
    batch row b count (p0 plays no part); a block without a valid key gets mean 0.
    """
    check_kernel_dtype(k, "block_means")
    B, Hkv, S, D = k.shape
    M = cdiv(S, block_size)
    kmean = torch.empty((B, Hkv, M, D), dtype=out_dtype, device=k.device)
    vmean = torch.empty_like(kmean) if v is not None else kmean
    vv = v if v is not None else k
    ks, ke = (kmean, kmean) if span is None else (span.ks, span.ke)
    DP = max(16, triton.next_power_of_2(int(D)))
    # Row chunks keep the per-program tile at <= 4K elements (no register spills at D = 256).
    rows = max(1, min(block_size, 4096 // DP))
    launcher(_block_means_kernel)[(M, B * Hkv)](
        k, vv, kmean, vmean, ks, ke, *k.stride(), *vv.stride(), S, M, Hkv,
        BLOCK=block_size, D=D, DP=DP, ROWS=rows, HAS_V=v is not None, SPAN=span is not None,
        num_warps=4)
    return kmean if v is None else (kmean, vmean)


# ------------------------------------------------------------------------------ reference

def block_counts(S: int, block_size: int, device, dtype=torch.float32) -> torch.Tensor:
    """Tokens in each key block: (M,), the last one partial when S % block_size != 0."""
    M = cdiv(S, block_size)
    counts = torch.full((M,), float(block_size), device=device, dtype=dtype)
    counts[-1] = S - (M - 1) * block_size
    return counts


def key_block_means(k: torch.Tensor, block_size: int, span: Span | None = None) -> torch.Tensor:
    """Plain-torch ``block_means``: (B, Hkv, S, D) -> (B, Hkv, M, D) fp32 (fp64 for fp64).

    span: the means of the valid keys ks[b] <= j < ke[b] only; 0 for a block without one.
    """
    B, Hkv, S, D = k.shape
    M = cdiv(S, block_size)
    kf = k.to(acc_dtype(k))
    if span is None:
        counts = block_counts(S, block_size, k.device, kf.dtype)[:, None]
    else:
        j = torch.arange(S, device=k.device)
        valid = (j >= span.ks.to(k.device)[:, None]) & (j < span.ke.to(k.device)[:, None])
        # where, not a product: a NaN in a padding key must not reach the means
        kf = torch.where(valid[:, None, :, None], kf, torch.zeros_like(kf))
        counts = F.pad(valid, (0, M * block_size - S)).view(B, 1, M, block_size, 1)
        counts = counts.sum(dim=3).to(kf.dtype).clamp_min(1)
    kf = F.pad(kf, (0, 0, 0, M * block_size - S))
    sums = kf.view(B, Hkv, M, block_size, D).sum(dim=3)
    return sums / counts


def key_block_stats(k: torch.Tensor, v: torch.Tensor, block_size: int):
    """Per key block: mean key, mean value (fp32, (B, Hkv, M, D)) and token count ((M,) fp32)."""
    kmean = key_block_means(k, block_size)
    counts = block_counts(k.shape[2], block_size, k.device, kmean.dtype)
    return kmean, key_block_means(v, block_size), counts
