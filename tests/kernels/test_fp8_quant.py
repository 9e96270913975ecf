"""Per-block e4m3 quantisation: the reference's contract on the CPU, the Triton kernel against
it (interpreter on the CPU: bit-exact; GPU-marked: bf16 at a longer length)."""

import pytest
import torch

from fp_compile.kernels.fp8_quant import (E4M3_MAX, FP8_DTYPE, dequantize, quantize_blocks,
                                          quantize_blocks_reference)
from tests.helpers import gpu


def _x(B, Hx, S, D, dtype, seed=0, device="cpu"):
    """Values spread over several binades per block, one all-zero block."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, Hx, S, D, generator=g) * torch.rand(B, Hx, S, 1, generator=g) * 50
    x[0, 0, :32] = 0
    return x.to(device, dtype)


@pytest.mark.parametrize("transpose", [False, True], ids=["rows", "transposed"])
def test_reference_scales_and_round_trip(transpose):
    bs = 32
    x = _x(2, 3, 100, 24, torch.bfloat16)
    t = quantize_blocks_reference(x, bs, transpose)
    assert t.data.dtype == FP8_DTYPE and t.data.shape == x.shape
    assert t.scale.dtype == torch.float32 and t.scale.shape == (2, 3, 4)
    xf = torch.nn.functional.pad(x.float(), (0, 0, 0, 4 * bs - 100)).unflatten(2, (4, bs))
    amax = xf.abs().amax(dim=(-2, -1))
    assert torch.equal(t.scale[amax > 0], amax[amax > 0] / E4M3_MAX)
    assert t.scale[0, 0, 0] == 1.0 and not t.data[0, 0, :32].float().any()  # a zero block
    # every block reaches +-448 exactly (its amax element)
    top = t.data.float().abs().amax(dim=-1)
    top = torch.nn.functional.pad(top, (0, 4 * bs - 100)).unflatten(2, (4, bs)).amax(-1)
    assert torch.equal(top[amax > 0], torch.full_like(top[amax > 0], E4M3_MAX))
    # nearest rounding: half a step, 2^-4 relative for normals, 2^-10 * scale for subnormals
    scale = t.scale.repeat_interleave(bs, -1)[..., :100, None]
    err = (dequantize(t, bs) - x.float()).abs()
    assert (err <= x.float().abs() * 2 ** -4 + scale * 2 ** -10 + 1e-6 * scale).all()
    if transpose:   # S contiguous, the buffer's rows padded to 16
        assert t.data.stride()[2:] == (1, 112)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("transpose", [False, True], ids=["rows", "transposed"])
@pytest.mark.parametrize("shape,bs", [((2, 3, 100, 24), 32), ((1, 2, 64, 64), 64),
                                      ((1, 1, 13, 128), 32)],
                         ids=["odd", "one_block", "short"])
def test_kernel_matches_reference(shape, bs, transpose, dtype):
    x = _x(*shape, dtype)
    got = quantize_blocks(x, bs, transpose)
    want = quantize_blocks_reference(x, bs, transpose)
    assert got.data.stride() == want.data.stride()
    assert torch.equal(got.scale, want.scale)
    assert torch.equal(got.data.view(torch.uint8), want.data.view(torch.uint8))


def test_kernel_reads_any_strides():
    x = _x(1, 4, 70, 32, torch.float16).transpose(1, 2).contiguous().transpose(1, 2)
    assert not x.is_contiguous()
    got, want = quantize_blocks(x, 32), quantize_blocks_reference(x.contiguous(), 32)
    assert torch.equal(got.data.view(torch.uint8), want.data.view(torch.uint8))


@gpu
@pytest.mark.parametrize("transpose", [False, True], ids=["rows", "transposed"])
def test_gpu_kernel_matches_reference(transpose):
    x = _x(1, 8, 4100, 128, torch.bfloat16, device="cuda")
    got = quantize_blocks(x, 128, transpose)
    want = quantize_blocks_reference(x, 128, transpose)
    torch.testing.assert_close(got.scale, want.scale, atol=0, rtol=2e-7)
    # one e4m3 step at most where the scales' last bits differ; nearly all equal
    diff = (got.data.float() - want.data.float()).abs()
    assert (diff <= want.data.float().abs() * 2 ** -3 + 2 ** -9).all()
    assert (diff > 0).float().mean() < 1e-3
