"""FP8 (e4m3) block-sparse flash-attention forward: ``block_sparse_attention`` over the same
compact selection, with both dots in FP8.

Inputs come quantised per block (``fp8_quant``): q per (head, query block), k and v per
(kv head, key block), each block with one fp32 scale; v in the transposed layout (S
contiguous) that Hopper's FP8 wgmma wants for the B operand of P @ V. Per key tile:

* logits: ``dot(q8, k8^T)`` (fp32 accumulation) times ``q_scale * k_scale * scale * log2(e)``;
* online softmax in fp32 (exp2 form), the row sum over the unrounded p;
* P @ V: p (in [0, 1]) times ``P_SCALE`` rounded to e4m3, ``dot(p8, v8)`` into the fp32
  accumulator. v's scale changes from key block to key block, so the accumulator is kept in
  units of the current block's ``v_scale / P_SCALE`` and rescaled, when the unit changes, in
  the multiply that the online softmax does anyway (no extra pass over the accumulator).

Structure as ``block_sparse_attention`` (one program per (batch * query head, query tile),
last tiles first, kept blocks before the diagonal without masks, the diagonal's sub-tiles
masked only where they cross the tile); without spans, mean correction or the LSE. Query
head h reads kv head h // (H // Hkv). The output has the dtype of ``out`` (q's, in the
dispatch). ``block_sparse_attention_fp8_reference`` says what it computes, in plain torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_tiles import _kept_split
from .fp8_quant import Fp8Blocks, dequantize, to_e4m3
from .utils import LOG2E, expand_indices, group_view, interpreting, launcher, rows_per_chunk

# p (in [0, 1]) is scaled by this before its e4m3 rounding: a power of two, so the scaling
# itself is exact; e4m3 keeps 3 mantissa bits from 2^-6 / P_SCALE up (subnormals below).
P_SCALE = 256.0
_P_SCALE = tl.constexpr(P_SCALE)     # the kernels' copy (a jit function reads constexpr globals)

# Launch config (BLOCK_M, BLOCK_N, num_warps, num_stages) per selection block size, D <= 128.
FP8_TILES = {128: (128, 128, 8, 3), 64: (64, 64, 4, 3), 32: (32, 32, 4, 2)}
FP8_BLOCK_SIZES = tuple(sorted(FP8_TILES))
FP8_MAX_HEAD_DIM = 128


@triton.jit
def _fp8_step(acc, m_i, l_i, unit, q, k_ptrs, v_ptrs, load_mask, s_scale, v_unit, visible,
              MASKED: tl.constexpr, PAD_D: tl.constexpr, EXACT_ROUND: tl.constexpr):
    """One key tile. acc (BLOCK_M, DP) fp32 in units of ``unit``; m_i / l_i (BLOCK_M,) running
    max / sum in log2 units; q (BLOCK_M, DP) e4m3; s_scale: the logits' scale (log2 units);
    v_unit: this tile's v_scale / P_SCALE; visible (BLOCK_M, BLOCK_N) bool, read if MASKED.
    Returns acc (now in units of v_unit), m_i, l_i, v_unit."""
    if MASKED or PAD_D:
        k = tl.load(k_ptrs, mask=load_mask, other=0.0)
        v = tl.load(v_ptrs, mask=load_mask, other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    s = tl.dot(q, tl.trans(k)) * s_scale
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_sub = m_new
    if MASKED:
        # A row that has seen only -inf: subtract 0, so exp2 gives 0, not NaN.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_sub)
    p = tl.math.exp2(s - m_sub[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    p8 = to_e4m3(p * _P_SCALE, EXACT_ROUND)
    acc = tl.dot(p8, v, acc * (alpha * (unit / v_unit))[:, None])
    return acc, m_new, l_i, v_unit


@triton.jit
def _bsa_fp8_kernel(q_ptr, k_ptr, v_ptr, o_ptr, qs_ptr, ks_ptr, vs_ptr, num_ptr, idx_ptr,
                    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                    sob, soh, sos, sod, sqsb, sqsh, sqsm, sksb, sksh, sksm, svsb, svsh, svsm,
                    snb, snh, snm, sib, sih, sim, sin,
                    S, SQ, Q0, H, G, qk_scale,
                    D: tl.constexpr, DP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EXACT_ROUND: tl.constexpr):
    """Grid (B * H, cdiv(SQ, BLOCK_M)); writes out[b, h, tile rows, :D].

    q (B, H, SQ, D) e4m3 at positions Q0 .. Q0 + SQ - 1 (Q0 a multiple of BLOCK_SIZE), its
    scales (B, H, cdiv(SQ, BLOCK_SIZE)); k, v (B, H // G, S, D) e4m3, their scales
    (B, H // G, cdiv(S, BLOCK_SIZE)); every tensor with any strides. num (B, H, n) and idx
    (B, H, n, M) int32 for query blocks Q0 // BLOCK_SIZE onwards.
    """
    tl.static_assert(BLOCK_SIZE % BLOCK_M == 0, "a query tile must lie in one selection block")
    tl.static_assert(BLOCK_SIZE % BLOCK_N == 0, "a key tile must lie in one selection block")
    tl.static_assert(DP >= D)
    SUB: tl.constexpr = BLOCK_SIZE // BLOCK_N
    PAD_D: tl.constexpr = DP != D

    qk_scale = tl.cast(qk_scale, tl.float32)
    pid_bh = tl.program_id(0)
    tile = tl.num_programs(1) - 1 - tl.program_id(1)     # heaviest (last) tiles first
    start_l = tile * BLOCK_M
    start_m = Q0 + start_l
    i = start_m // BLOCK_SIZE
    li = start_l // BLOCK_SIZE                            # row of num / idx / q's scales
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
    q_scale = tl.load(qs_ptr + b * sqsb + h * sqsh + li * sqsm) * qk_scale
    k_base = k_ptr + b * skb + kvh * skh
    v_base = v_ptr + b * svb + kvh * svh
    k_tile = offs_n[:, None] * sks + offs_d[None, :] * skd  # (BLOCK_N, DP)
    v_tile = offs_n[:, None] * svs + offs_d[None, :] * svd
    kv_d_mask = d_ok[None, :]
    ks_row = ks_ptr + b * sksb + kvh * sksh
    vs_row = vs_ptr + b * svsb + kvh * svsh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DP], dtype=tl.float32)
    unit = tl.full([], 1.0, dtype=tl.float32)
    no_mask = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int1)   # never read (MASKED=False)

    num = tl.load(num_ptr + b * snb + h * snh + li * snm)
    idx_row = idx_ptr + b * sib + h * sih + li.to(tl.int64) * sim
    n_full, diag = _kept_split(idx_row, sin, num, i)   # entries before the diagonal; is it kept

    # 1. Kept blocks before the diagonal: full and fully visible, no masks.
    for t in range(0, n_full * SUB):
        j = tl.load(idx_row + (t // SUB) * sin)
        start_n = (j * BLOCK_SIZE + (t % SUB) * BLOCK_N).to(tl.int64)
        acc, m_i, l_i, unit = _fp8_step(
            acc, m_i, l_i, unit, q, k_base + start_n * sks + k_tile,
            v_base + start_n * svs + v_tile, kv_d_mask, q_scale * tl.load(ks_row + j * sksm),
            tl.load(vs_row + j * svsm) / _P_SCALE, no_mask, False, PAD_D, EXACT_ROUND)

    # 2. The diagonal block, if kept: sub-tiles ending at or before start_m unmasked, those
    # crossing the tile masked (causal, sequence end), later ones skipped.
    diag_lo = i.to(tl.int64) * BLOCK_SIZE
    mask_lo = diag_lo + ((start_m - diag_lo) // BLOCK_N) * BLOCK_N
    diag_hi = tl.where(diag, tl.minimum(start_m + BLOCK_M, S), diag_lo)
    open_hi = tl.where(diag, mask_lo, diag_lo)
    s_diag = q_scale * tl.load(ks_row + i * sksm)
    u_diag = tl.load(vs_row + i * svsm) / _P_SCALE
    for start_n in range(diag_lo, open_hi, BLOCK_N):
        acc, m_i, l_i, unit = _fp8_step(
            acc, m_i, l_i, unit, q, k_base + start_n * sks + k_tile,
            v_base + start_n * svs + v_tile, kv_d_mask, s_diag, u_diag, no_mask, False, PAD_D,
            EXACT_ROUND)
    for start_n in range(mask_lo, diag_hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < S
        visible = (cols[None, :] <= offs_m[:, None]) & col_ok[None, :]
        acc, m_i, l_i, unit = _fp8_step(
            acc, m_i, l_i, unit, q, k_base + start_n * sks + k_tile,
            v_base + start_n * svs + v_tile, col_ok[:, None] & kv_d_mask, s_diag, u_diag,
            visible, True, PAD_D, EXACT_ROUND)

    # Rows that saw nothing (no kept block) get 0 / 0 = NaN, as the reference's softmax.
    out = acc * (unit / l_i)[:, None]
    tl.store(o_ptr + b * sob + h * soh + offs_l[:, None].to(tl.int64) * sos
             + offs_d[None, :] * sod, out.to(o_ptr.dtype.element_ty), mask=q_mask)


def check_fp8_shapes(block_size: int, head_dim: int, what: str) -> None:
    """The block sizes and head dims the FP8 kernel serves (ValueError otherwise)."""
    if block_size not in FP8_BLOCK_SIZES:
        raise ValueError(f"{what}: FP8 attention takes block_size in {FP8_BLOCK_SIZES}, got "
                         f"{block_size}")
    if head_dim > FP8_MAX_HEAD_DIM:
        raise ValueError(f"{what}: FP8 attention takes head dims up to {FP8_MAX_HEAD_DIM}, "
                         f"got {head_dim}")


def block_sparse_attention_fp8(q: Fp8Blocks, k: Fp8Blocks, v: Fp8Blocks,
                               kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
                               scale: float, block_size: int, out: torch.Tensor, *,
                               q_start: int = 0,
                               tile: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Causal attention over the kept key blocks with e4m3 q, k, v (``fp8_quant``). Writes and
    returns ``out`` (B, H, S_q, D), of the output dtype (fp16/bf16/fp32), any strides.

    q.data (B, H, S_q, D), k.data / v.data (B, Hkv, S, D), H % Hkv == 0, any strides (v is
    fastest with the transposed layout ``quantize_blocks(v, transpose=True)`` gives), scales
    per block of ``block_size`` rows. kv_num_blocks (B, H, n), kv_indices (B, H, n, M) int32
    as for ``block_sparse_attention``; q_start as there (the queries' first position, a
    multiple of block_size; the selection's rows are their query blocks).
    tile: (BLOCK_M, BLOCK_N, num_warps, num_stages), default ``FP8_TILES[block_size]``.
    """
    B, H, SQ, D = q.data.shape
    Hkv, S = k.data.shape[1], k.data.shape[2]
    check_fp8_shapes(block_size, D, "block_sparse_attention_fp8")
    if q_start and (q_start % block_size or q_start + SQ > S):
        raise ValueError(f"block_sparse_attention_fp8: q_start={q_start} must be a multiple of "
                         f"block_size={block_size} with q_start + S_q <= S_kv={S}")
    if tile is None:
        tile = (min(block_size, 32),) * 2 + (4, 1) if interpreting() else FP8_TILES[block_size]
    bm, bn, warps, stages = tile
    # fp8 dots take K >= 32 on the GPU: the head dim is padded to 32 at least.
    DP = max(32, triton.next_power_of_2(int(D)))
    grid = (B * H, triton.cdiv(SQ, bm))
    launcher(_bsa_fp8_kernel)[grid](
        q.data, k.data, v.data, out, q.scale, k.scale, v.scale, kv_num_blocks, kv_indices,
        *q.data.stride(), *k.data.stride(), *v.data.stride(), *out.stride(),
        *q.scale.stride(), *k.scale.stride(), *v.scale.stride(),
        *kv_num_blocks.stride(), *kv_indices.stride(),
        S, SQ, q_start, H, H // Hkv, float(scale) * LOG2E,
        D=D, DP=DP, BLOCK_SIZE=block_size, BLOCK_M=bm, BLOCK_N=bn,
        EXACT_ROUND=interpreting(), num_warps=warps, num_stages=stages)
    return out


def block_sparse_attention_fp8_reference(q: Fp8Blocks, k: Fp8Blocks, v: Fp8Blocks,
                                         kv_num_blocks: torch.Tensor,
                                         kv_indices: torch.Tensor, scale: float,
                                         block_size: int, out_dtype: torch.dtype,
                                         q_start: int = 0) -> torch.Tensor:
    """What ``block_sparse_attention_fp8`` computes, in plain fp32 torch: attention of the
    dequantised q, k, v over the kept blocks (causal), with p = exp(logit - row max) rounded
    to e4m3 after scaling by P_SCALE in P @ V and unrounded in the row sum. (The kernel
    rounds p against the running max of its online softmax, not the row's final max: the two
    differ by about one e4m3 rounding of p.) Returns (B, H, S_q, D) of ``out_dtype``."""
    qf = dequantize(q, block_size)
    kf, vf = dequantize(k, block_size), dequantize(v, block_size)
    B, H, SQ, D = qf.shape
    Hkv, S = kf.shape[1], kf.shape[2]
    keep_g = group_view(expand_indices(kv_num_blocks, kv_indices), Hkv)   # (B,Hkv,G,n,M)
    cols = torch.arange(S, device=qf.device)
    out = torch.empty((B, H, SQ, D), dtype=out_dtype, device=qf.device)
    step = rows_per_chunk(B, H, S, 1)
    for r0 in range(0, SQ, step):
        r1 = min(SQ, r0 + step)
        rows = q_start + torch.arange(r0, r1, device=qf.device)
        qc = group_view(qf[:, :, r0:r1], Hkv)
        logits = scale * torch.matmul(qc, kf.unsqueeze(2).transpose(-1, -2))  # (B,Hkv,G,r,S)
        allowed = keep_g[:, :, :, (rows - q_start) // block_size][..., cols // block_size]
        allowed = allowed & (cols[None, :] <= rows[:, None])
        logits = logits.masked_fill(~allowed, float("-inf"))
        p = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
        p8 = (p * P_SCALE).to(torch.float8_e4m3fn).to(torch.float32) / P_SCALE
        o = torch.matmul(p8, vf.unsqueeze(2)) / p.sum(dim=-1, keepdim=True)
        out[:, :, r0:r1] = o.flatten(1, 2).to(out_dtype)
    return out
