"""The fp8_attention option through the config, the op and the dispatch: off by default and
under the paper's rule, ValueError where it cannot run, the op on the CPU equal to
``dispatch.reference`` (the dequantising reference), the op on the GPU close to dense SDPA."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import fp_compile
from fp_compile import FlashPrefillConfig, dispatch
from fp_compile.accuracy import rel_l2
from fp_compile.demo.synthetic import planted_qkv
from fp_compile.kernels.block_sparse_attention_fp8 import FP8_TILES
from fp_compile.ops import OP_CONFIG_FIELDS
from tests.helpers import gpu

# dense_above=1: every kv group block-sparse, so the FP8 kernel runs
SMALL = dict(block_size=32, min_seq_len=0, alpha=0.2, dense_above=1.0)


def test_off_by_default_and_in_the_paper_rule():
    assert FlashPrefillConfig().fp8_attention is False
    assert FlashPrefillConfig.paper_rule().fp8_attention is False
    assert FlashPrefillConfig.from_options({"fp8_attention": True}).fp8_attention
    assert "fp8_attention" in OP_CONFIG_FIELDS
    assert sorted(FP8_TILES) == [32, 64, 128]
    with pytest.raises(ValueError, match="fp8_attention must be a bool"):
        FlashPrefillConfig(fp8_attention=1)


@pytest.mark.parametrize("dtype,D,fields,match", [
    (torch.float32, 32, {}, "float16 or bfloat16"),
    (torch.bfloat16, 160, {}, "head dims up to 128"),
    (torch.bfloat16, 32, {"block_size": 16}, "block_size in"),
    (torch.bfloat16, 32, {"block_size": 256}, "block_size in"),
    (torch.bfloat16, 32, {"mean_correction": True}, "mean_correction"),
], ids=["fp32", "D160", "block16", "block256", "mean_correction"])
@pytest.mark.parametrize("kernel", ["auto", "reference"])
def test_op_refuses(dtype, D, fields, match, kernel):
    """The same rule on every device and kernel, short prompts included."""
    q, k, v = planted_qkv(1, 2, 1, 64, D, seed=0, dtype=dtype)
    cfg = FlashPrefillConfig(**{**SMALL, **fields}, kernel=kernel, fp8_attention=True)
    with pytest.raises(ValueError, match="fp8_attention=True.*" + match):
        fp_compile.flash_prefill(q, k, v, enable_gqa=True, config=cfg)
    with pytest.raises(ValueError, match="fp8_attention"):
        fp_compile.flash_prefill(q, k, v, enable_gqa=True,
                                 config=cfg.replace(min_seq_len=10**6))


def test_op_refuses_span_calls():
    q, k, v = planted_qkv(1, 2, 1, 64, 32, seed=0, dtype=torch.bfloat16)
    cfg = FlashPrefillConfig(**SMALL, fp8_attention=True)
    with pytest.raises(ValueError, match="fp8_attention=True is not supported for padded"):
        fp_compile.flash_prefill(q[:, :, 32:], k, v, enable_gqa=True, config=cfg)


def test_op_on_cpu_is_the_dequantising_reference():
    q, k, v = planted_qkv(1, 4, 2, 256, 32, seed=1, dtype=torch.bfloat16)
    cfg = FlashPrefillConfig(**SMALL, fp8_attention=True)
    out = fp_compile.flash_prefill(q, k, v, enable_gqa=True, config=cfg)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, dispatch.reference(q, k, v, None, cfg))
    plain = fp_compile.flash_prefill(q, k, v, enable_gqa=True,
                                     config=cfg.replace(fp8_attention=False))
    dense = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True,
                                           enable_gqa=True)
    # FP8 rounding adds error on top of the selection's, within e4m3's few percent
    assert 0 < rel_l2(out, plain) < 0.08
    assert rel_l2(out, dense) < rel_l2(plain, dense) + 0.08


@gpu
@pytest.mark.parametrize("fields", [{}, {"mass_floor": 0.0, "dense_above": 1.0}],
                         ids=["defaults", "paper_guards_off"])
def test_gpu_op_close_to_dense(fields):
    """The whole op with FP8 at 8K (planted inputs, bf16): within e4m3's error of the bf16
    op's distance to dense SDPA, and equal to its own torch.compile'd form."""
    q, k, v = planted_qkv(1, 8, 2, 8192, 128, seed=0, dtype=torch.bfloat16, device="cuda")
    cfg = dataclasses.replace(FlashPrefillConfig(min_seq_len=0, **fields), fp8_attention=True)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out = fp_compile.flash_prefill(q, k, v, enable_gqa=True, config=cfg)
    plain = fp_compile.flash_prefill(q, k, v, enable_gqa=True,
                                     config=cfg.replace(fp8_attention=False))
    assert out.isfinite().all()
    assert rel_l2(out, dense) < rel_l2(plain, dense) + 0.08
    compiled = torch.compile(
        lambda q, k, v: fp_compile.flash_prefill(q, k, v, enable_gqa=True, config=cfg),
        fullgraph=True, dynamic=False)
    assert rel_l2(compiled(q, k, v), out) < 1e-3
