"""Per-block FP8 (e4m3) quantisation of q, k and v for the FP8 block-sparse attention.

Every (batch, head, block of ``block_size`` rows) gets one fp32 scale, ``amax / 448`` (448 is
e4m3's largest finite value; a block of zeros gets scale 1), and its values become
``x / scale`` rounded to nearest-even e4m3 (``torch.float8_e4m3fn``, Triton's
``tl.float8e4nv``). A query tile and a key tile of the attention kernel lie inside one
selection block, so each carries one scalar scale.

Layouts: x (B, Hx, S, D), any strides, float16/bfloat16/float32. Output ``Fp8Blocks``:
data (B, Hx, S, D) e4m3, scale (B, Hx, ceil(S / block_size)) fp32. With ``transpose`` (for v)
the data is a (B, Hx, S, D) view of a (B, Hx, D, S_pad) contiguous buffer (S_pad: S rounded up
to 16): S is the contiguous dim, what Hopper's FP8 wgmma wants of the B operand of P @ V (it
reads B K-major, K being the key dim there).

Triton's interpreter (3.9) misrounds fp32 -> e4m3 casts that carry into the exponent
(1.98 -> 1.0) and rounds ties away from zero, so under the interpreter ``to_e4m3`` first
rounds in fp32 arithmetic (nearest-even, to an exactly representable value) and the cast is
exact; on the GPU the cast itself rounds (cvt.rn.satfinite).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .utils import cdiv, interpreting, launcher

E4M3_MAX = 448.0
_E4M3_MAX = tl.constexpr(E4M3_MAX)   # the kernels' copy (a jit function reads constexpr globals)
FP8_DTYPE = torch.float8_e4m3fn


class Fp8Blocks(NamedTuple):
    """A tensor quantised per block: data (B, Hx, S, D) e4m3, scale (B, Hx, M) fp32; the
    values are ``data * scale`` of their block (rows m * block_size onwards)."""
    data: torch.Tensor
    scale: torch.Tensor


@triton.jit
def to_e4m3(x, EXACT_ROUND: tl.constexpr):
    """fp32 x with |x| <= 448 -> tl.float8e4nv, rounded to nearest even."""
    if EXACT_ROUND:
        # Round |x| to e4m3's grid in fp32: the spacing of its binade is 2^(e - 3) (e >= -6,
        # the subnormals share the smallest binade's); adding and removing 1.5 * 2^(e + 20)
        # leaves exactly that spacing in the fp32 sum, which rounds to nearest even.
        e = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        e = tl.maximum(e, -6)
        magic = (((e + 147) << 23) | (1 << 22)).to(tl.float32, bitcast=True)
        r = (tl.abs(x) + magic) - magic
        x = tl.where(x < 0, -r, r)                  # -0 stays -0, as the cast gives it
    return x.to(tl.float8e4nv)


@triton.jit
def _quant_kernel(x_ptr, y_ptr, s_ptr, sxb, sxh, sxs, sxd, syb, syh, sys, syd, S, Hx, M,
                  D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr,
                  EXACT_ROUND: tl.constexpr):
    """Grid (B * Hx, M): block m of head (b, h) to e4m3 at y, its scale at s[(b*Hx + h)*M + m].
    x, y: (B, Hx, S, D) with any strides (y's are the transposed buffer's for v)."""
    pid = tl.program_id(0)
    m = tl.program_id(1)
    b = (pid // Hx).to(tl.int64)
    h = (pid % Hx).to(tl.int64)
    rows = m * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, DP)
    mask = (rows < S)[:, None] & (cols < D)[None, :]
    rows64 = rows[:, None].to(tl.int64)
    x = tl.load(x_ptr + b * sxb + h * sxh + rows64 * sxs + cols[None, :] * sxd, mask=mask,
                other=0.0).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    scale = tl.where(amax > 0, amax / _E4M3_MAX, 1.0)
    inv = _E4M3_MAX / tl.where(amax > 0, amax, 1.0)    # a block of zeros stays zeros
    y = to_e4m3(tl.minimum(tl.maximum(x * inv, -_E4M3_MAX), _E4M3_MAX), EXACT_ROUND)
    tl.store(y_ptr + b * syb + h * syh + rows64 * sys + cols[None, :] * syd, y, mask=mask)
    tl.store(s_ptr + pid.to(tl.int64) * M + m, scale)


def _empty_fp8(x: torch.Tensor, transpose: bool) -> torch.Tensor:
    """An uninitialised e4m3 tensor of x's shape: contiguous, or (transpose) a view of a
    (B, Hx, D, S_pad) contiguous buffer."""
    B, Hx, S, D = x.shape
    if not transpose:
        return torch.empty((B, Hx, S, D), dtype=FP8_DTYPE, device=x.device)
    buf = torch.empty((B, Hx, D, cdiv(S, 16) * 16), dtype=FP8_DTYPE, device=x.device)
    return buf[..., :S].transpose(-1, -2)


def quantize_blocks(x: torch.Tensor, block_size: int, transpose: bool = False) -> Fp8Blocks:
    """x (B, Hx, S, D) -> Fp8Blocks, one scale per block of ``block_size`` rows (Triton)."""
    B, Hx, S, D = x.shape
    M = cdiv(S, block_size)
    y = _empty_fp8(x, transpose)
    scale = torch.empty((B, Hx, M), dtype=torch.float32, device=x.device)
    DP = max(16, triton.next_power_of_2(int(D)))
    launcher(_quant_kernel)[(B * Hx, M)](
        x, y, scale, *x.stride(), *y.stride(), S, Hx, M, D=D, DP=DP, BLOCK=block_size,
        EXACT_ROUND=interpreting(), num_warps=8 if block_size * DP >= 8192 else 4)
    return Fp8Blocks(y, scale)


def quantize_blocks_reference(x: torch.Tensor, block_size: int,
                              transpose: bool = False) -> Fp8Blocks:
    """What ``quantize_blocks`` computes, in plain torch (any device)."""
    B, Hx, S, D = x.shape
    M = cdiv(S, block_size)
    xf = torch.nn.functional.pad(x.to(torch.float32), (0, 0, 0, M * block_size - S))
    xf = xf.view(B, Hx, M, block_size, D)
    amax = xf.abs().amax(dim=(-2, -1))
    scale = torch.where(amax > 0, amax / E4M3_MAX, 1.0)
    # A true division (a Python number over a tensor is a reciprocal times the number in
    # torch, one ulp off the kernel's quotient at times).
    inv = torch.full_like(amax, E4M3_MAX) / torch.where(amax > 0, amax, 1.0)
    y = (xf * inv[..., None, None]).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    out = _empty_fp8(x, transpose)
    out.copy_(y.view(B, Hx, M * block_size, D)[:, :, :S])
    return Fp8Blocks(out, scale)


def dequantize(t: Fp8Blocks, block_size: int, dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
    """Fp8Blocks -> (B, Hx, S, D) of ``dtype``: each block's data times its scale."""
    S = t.data.shape[2]
    scale = t.scale.repeat_interleave(block_size, dim=-1)[..., :S, None]
    return (t.data.to(torch.float32) * scale).to(dtype)
