"""Variants of the block-sparse attention forward for tuning on Hopper (issue 12).

Same contract and same walk as ``block_sparse_attention`` for its common path (no span, no mean
correction, no LSE output; those options go to that kernel unchanged): one program per
(batch * query head, query tile of BLOCK_M rows), the kept blocks j < i in one flat unmasked
loop whose bound is read in the kernel, then the diagonal block (unmasked key sub-tiles, then
the causal ones). What a variant changes (``VARIANTS``, each a set of constexprs):

* TMA: K and V come through host-side tensor descriptors over the 2-D views (B * Hkv * S, D)
  of k and v (TMA copies into shared memory, no address arithmetic per element). A descriptor
  zero-fills only past the whole view, so key rows past S of one head read the next head's
  keys; only the last selection block can hold such rows, it is only ever a diagonal block,
  and the causal mask (key <= query < S) already hides them, with p = 0 times finite values.
* FOLD: the row max is taken on the raw q . k and scaled once per row; the logits enter exp2
  as one fused multiply-add (qk * scale - max) instead of a multiply then a subtraction.

Measured on the H200 (RESULTS.md run 45) and dropped: a lazy rescale (the max moving only when
a row outgrew it by 2^8) was 5-10% slower with 6e-4-1e-3 relative error; Triton's automatic
warp specialisation (``tl.range(..., warp_specialize=True)``) timed as without it at 8 warps
and failed to compile at 4.

The pointer variants (TMA off) run in Triton's interpreter; TMA ones too (Triton >= 3.4's
interpreter reads host descriptors). Query-head packing of GQA groups is not here: packing G
heads into one BLOCK_M-row tile loads each K/V tile once per BLOCK_M rows, as now, so it only
pays with larger tiles than the registers hold at D = 128.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import triton
import triton.language as tl

from .attention_tiles import _kept_split
from .block_sparse_attention import block_sparse_attention, capture_tile
from .utils import LOG2E, check_kernel_dtype, hopper, interpreting, launcher, tracing

# name -> constexprs. "ptr" is the existing kernel's math on this module's code (a control).
VARIANTS = {
    "ptr": dict(TMA=False, FOLD=False),
    "ptr_fold": dict(TMA=False, FOLD=True),
    "tma": dict(TMA=True, FOLD=False),
    "tma_fold": dict(TMA=True, FOLD=True),
}


@triton.jit
def _load_kv(k_src, v_src, start_n, row0, sks, svs, k_tile, v_tile, kv_mask,
             TMA: tl.constexpr, MASK: tl.constexpr):
    """Key and value rows start_n .. start_n + BLOCK_N - 1 of this kv head: with TMA rows
    row0 + start_n of the 2-D descriptors, else through the per-head base pointers."""
    if TMA:
        k = k_src.load([row0 + start_n, 0])
        v = v_src.load([row0 + start_n, 0])
    else:
        start = tl.cast(start_n, tl.int64)
        if MASK:
            k = tl.load(k_src + start * sks + k_tile, mask=kv_mask, other=0.0)
            v = tl.load(v_src + start * svs + v_tile, mask=kv_mask, other=0.0)
        else:
            k = tl.load(k_src + start * sks + k_tile)
            v = tl.load(v_src + start * svs + v_tile)
    return k, v


@triton.jit
def _step(acc, m_i, l_i, q, k, v, qk_scale, visible, MASKED: tl.constexpr,
          FOLD: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step over a key tile (m_i, l_i in log2 units).

    MASKED: ``visible`` (BLOCK_M, BLOCK_N) bool hides logits, and a row may have seen only
    -inf so far (exp2 must give 0, not NaN).
    """
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASKED:
        qk = tl.where(visible, qk, float("-inf"))
    if FOLD:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)   # qk_scale > 0 (host checks)
    else:
        qk = qk * qk_scale
        m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_sub = m_new
    if MASKED:
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_sub)
    acc = acc * alpha[:, None]
    l_i = l_i * alpha
    if FOLD:
        p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
    else:
        p = tl.math.exp2(qk - m_sub[:, None])
    l_i = l_i + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit
def _kept_tile(acc, m_i, l_i, q, t, idx_row, sin, k_base, v_base, row0, sks, svs, k_tile,
               v_tile, kv_d_mask, qk_scale, q_mask, SUB: tl.constexpr, BLOCK_SIZE: tl.constexpr,
               BLOCK_N: tl.constexpr, TMA: tl.constexpr, PAD_D: tl.constexpr,
               FOLD: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Key sub-tile t % SUB of kept entry t // SUB (a block before the diagonal)."""
    j = tl.load(idx_row + (t // SUB) * sin)
    start_n = j * BLOCK_SIZE + (t % SUB) * BLOCK_N
    k, v = _load_kv(k_base, v_base, start_n, row0, sks, svs, k_tile, v_tile, kv_d_mask,
                    TMA, PAD_D)
    return _step(acc, m_i, l_i, q, k, v, qk_scale, q_mask, False, FOLD, DOT_PRECISION)


@triton.jit
def _bsa_variant_kernel(q_ptr, k_src, v_src, o_ptr, num_ptr, idx_ptr,
                        sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                        sob, soh, sos, sod, snb, snh, snm, sib, sih, sim, sin,
                        S, SQ, Q0, H, G, HKV, qk_scale,
                        D: tl.constexpr, DP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, TMA: tl.constexpr, FOLD: tl.constexpr):
    """Grid (B * H, cdiv(SQ, BLOCK_M)); as ``_bsa_fwd_kernel`` without span, mean correction
    or LSE. With TMA, k_src / v_src are descriptors of (B * HKV * S, D) with block
    (BLOCK_N, DP) and the k / v strides are unused; else they are k / v pointers."""
    tl.static_assert(BLOCK_SIZE % BLOCK_M == 0, "a query tile must lie in one selection block")
    tl.static_assert(BLOCK_SIZE % BLOCK_N == 0, "a key tile must lie in one selection block")
    SUB: tl.constexpr = BLOCK_SIZE // BLOCK_N
    PAD_D: tl.constexpr = DP != D

    qk_scale = tl.cast(qk_scale, tl.float32)
    pid_bh = tl.program_id(0)
    tile = tl.num_programs(1) - 1 - tl.program_id(1)   # heaviest (last) tiles first
    start_l = tile * BLOCK_M
    start_m = Q0 + start_l
    i = start_m // BLOCK_SIZE
    li = i - Q0 // BLOCK_SIZE
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    kvh = h // G

    offs_l = start_l + tl.arange(0, BLOCK_M)
    offs_m = Q0 + offs_l
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DP)
    d_ok = offs_d < D
    q_mask = (offs_l < SQ)[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_l[:, None].to(tl.int64) * sqs
                + offs_d[None, :] * sqd, mask=q_mask, other=0.0)
    if TMA:
        k_base = k_src
        v_base = v_src
        row0 = ((b * HKV + kvh) * S).to(tl.int32)   # first row of this head in the 2-D views
        k_tile = offs_n     # unused
        v_tile = offs_n
    else:
        k_base = k_src + b * skb + kvh * skh
        v_base = v_src + b * svb + kvh * svh
        row0 = 0
        k_tile = offs_n[:, None] * sks + offs_d[None, :] * skd
        v_tile = offs_n[:, None] * svs + offs_d[None, :] * svd
    kv_d_mask = offs_n[:, None] >= 0
    kv_d_mask = kv_d_mask & d_ok[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DP], dtype=tl.float32)

    num = tl.load(num_ptr + b * snb + h * snh + li * snm)
    idx_row = idx_ptr + b * sib + h * sih + li.to(tl.int64) * sim
    n_full, diag = _kept_split(idx_row, sin, num, i)   # entries before the diagonal; is it kept

    # 1. Kept blocks before the diagonal: full and fully visible, no masks.
    for t in range(0, n_full * SUB):
        acc, m_i, l_i = _kept_tile(acc, m_i, l_i, q, t, idx_row, sin, k_base, v_base, row0,
                                   sks, svs, k_tile, v_tile, kv_d_mask, qk_scale, q_mask,
                                   SUB, BLOCK_SIZE, BLOCK_N, TMA, PAD_D, FOLD, DOT_PRECISION)

    # 2. The diagonal block, when kept: unmasked key sub-tiles ending before the tile's first
    # row, then the ones crossing it (causal and sequence-end masks).
    diag_lo = i * BLOCK_SIZE
    mask_lo = diag_lo + ((start_m - diag_lo) // BLOCK_N) * BLOCK_N
    diag_hi = tl.where(diag, tl.minimum(start_m + BLOCK_M, S), diag_lo)
    open_hi = tl.where(diag, mask_lo, diag_lo)
    for start_n in range(diag_lo, open_hi, BLOCK_N):
        k, v = _load_kv(k_base, v_base, start_n, row0, sks, svs, k_tile, v_tile, kv_d_mask,
                        TMA, PAD_D)
        acc, m_i, l_i = _step(acc, m_i, l_i, q, k, v, qk_scale, q_mask, False, FOLD,
                              DOT_PRECISION)
    for start_n in range(mask_lo, diag_hi, BLOCK_N):
        cols = start_n + offs_n
        # Pointer loads must not read past S (the next head, or past the allocation).
        k, v = _load_kv(k_base, v_base, start_n, row0, sks, svs, k_tile, v_tile,
                        (cols < S)[:, None] & kv_d_mask, TMA, True)
        visible = (cols[None, :] <= offs_m[:, None]) & (cols < S)[None, :]
        acc, m_i, l_i = _step(acc, m_i, l_i, q, k, v, qk_scale, visible, True, FOLD,
                              DOT_PRECISION)

    # Rows that saw nothing get 0 / 0 = NaN, as the reference's softmax.
    out = acc / l_i[:, None]
    tl.store(o_ptr + b * sob + h * soh + offs_l[:, None].to(tl.int64) * sos
             + offs_d[None, :] * sod, out.to(o_ptr.dtype.element_ty), mask=q_mask)


def _row_view(t: torch.Tensor) -> bool:
    """Whether (B, Hkv, S, D) t is a 2-D (B * Hkv * S, D) view with unit column stride."""
    B, Hkv, S, D = t.shape
    sb, sh, ss, sd = t.stride()
    return sd == 1 and (Hkv == 1 or sh == S * ss) and (B == 1 or sb == Hkv * S * ss)


@functools.lru_cache(maxsize=None)
def _has_host_descriptors() -> bool:
    return importlib.util.find_spec("triton.tools.tensor_descriptor") is not None


def tma_supported(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether k and v can be read through 2-D TMA descriptors (Hopper or later, or the
    interpreter; 16-byte aligned base and row stride; rows addressable with int32).
    The device and Triton checks are cached: uncached they took 70 us of a profiled call on
    the H200's host (the profiler inflates host time about 2.3x; RESULTS.md run 60), time the
    GPU waits for when a call at 32K tokens is synced."""
    if not (interpreting() or hopper(k.device)) or not _has_host_descriptors():
        return False
    for t in (k, v):
        B, Hkv, S, _ = t.shape
        if not _row_view(t) or t.data_ptr() % 16 or (t.stride(2) * t.element_size()) % 16:
            return False
        if B * Hkv * S >= 2**31 - 2**20:
            return False
    return True


def _descriptor(t: torch.Tensor, block_n: int, dp: int):
    from triton.tools.tensor_descriptor import TensorDescriptor

    B, Hkv, S, D = t.shape
    return TensorDescriptor(t, [B * Hkv * S, D], [t.stride(2), 1], [block_n, dp])


def block_sparse_attention_variant(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
                                   scale: float, block_size: int, *, variant: str = "tma",
                                   tile: tuple[int, int, int, int] | None = None,
                                   out: torch.Tensor | None = None, q_start: int = 0,
                                   **options) -> torch.Tensor:
    """``block_sparse_attention`` (same arguments, same result to rounding) with ``variant``
    (a key of VARIANTS, or "default" for the existing kernel).

    A TMA variant reads K and V through pointers instead (the same math: "tma_fold" runs as
    "ptr_fold") while torch.compile / export trace the call (host descriptors are launched
    eagerly only) and where ``tma_supported`` says no (e.g. a transposed (B, S, Hkv, D) view).
    Goes to the existing kernel instead, unchanged: with any of its other options set (span,
    lse, mean_correction, kmean / vmean), and for scale <= 0 with FOLD.
    tile: (BLOCK_M, BLOCK_N, num_warps, num_stages); default the existing kernel's fixed tile.
    """
    check_kernel_dtype(q, "block_sparse_attention_variant")
    if variant != "default" and variant not in VARIANTS:
        raise ValueError(f"block_sparse_attention_variant: unknown variant {variant!r}; "
                         f"expected 'default' or one of {sorted(VARIANTS)}")
    flags = VARIANTS.get(variant)
    if flags is not None and flags["TMA"] and (tracing() or not tma_supported(k, v)):
        # Run 45: the pointer variants are 1.02-1.04x the existing kernel at 8K-128K.
        flags = dict(flags, TMA=False)
    fallback = (flags is None or any(val not in (None, False) for val in options.values())
                or (flags["FOLD"] and not scale > 0))
    if fallback:
        return block_sparse_attention(q, k, v, kv_num_blocks, kv_indices, scale, block_size,
                                      tile=tile, out=out, q_start=q_start, **options)
    B, H, SQ, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if q_start and (q_start % block_size or q_start + SQ > S):
        raise ValueError(f"block_sparse_attention_variant: q_start={q_start} must be a "
                         f"multiple of block_size={block_size} with q_start + S_q <= S_kv={S}")
    if out is None:
        out = q.new_empty(q.shape)
    DP = max(16, triton.next_power_of_2(int(D)))
    precision = "ieee"
    if q.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32:
        precision = "tf32"
    if tile is None:
        tile = (min(block_size, 32),) * 2 + (4, 1) if interpreting() else capture_tile(
            q, block_size)
    bm, bn, warps, stages = tile
    if flags["TMA"]:
        k_src, v_src = _descriptor(k, bn, DP), _descriptor(v, bn, DP)
    else:
        k_src, v_src = k, v
    grid = (B * H, triton.cdiv(SQ, bm))
    # (Never traced with TMA: the variant then reads through pointers, above.)
    launcher(_bsa_variant_kernel)[grid](
        q, k_src, v_src, out, kv_num_blocks, kv_indices,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *kv_num_blocks.stride(), *kv_indices.stride(),
        S, SQ, q_start, H, H // Hkv, Hkv, float(scale) * LOG2E,
        D=D, DP=DP, BLOCK_SIZE=block_size, BLOCK_M=bm, BLOCK_N=bn,
        DOT_PRECISION=precision, **flags, num_warps=warps, num_stages=stages)
    return out
