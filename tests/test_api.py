"""The registered op and the eager entry points: conventions, errors, opcheck."""

import math

import pytest
import torch
import torch.nn.functional as F

import fp_compile
from fp_compile import FlashPrefillConfig, flash_prefill, select_blocks
from fp_compile.ops import OP_CONFIG_FIELDS, op_config_args
from fp_compile.demo.synthetic import planted_qkv
from tests.helpers import assert_close

SPARSE = FlashPrefillConfig.paper_rule(block_size=16, min_seq_len=0, kernel="reference")


def qkv(B=1, H=4, Hkv=2, S=100, D=32, dtype=torch.float32, seed=0):
    return planted_qkv(B, H, Hkv, S, D, seed=seed, dtype=dtype)


@pytest.mark.parametrize("name", ["flash_prefill", "flash_prefill_eager", "flash_prefill_lse"])
def test_every_op_schema_lists_the_config_fields_in_order(name):
    """The op bodies read their config arguments by ``OP_CONFIG_FIELDS``: every schema holds
    q, k, v, scale, those fields in that order, then the layer, key mask and query positions."""
    schema = getattr(torch.ops.fp_compile, name).default._schema
    names = [a.name for a in schema.arguments]
    assert names == ["q", "k", "v", "scale", *OP_CONFIG_FIELDS, "layer", "key_mask", "q_pos"]


def test_flash_prefill_matches_sdpa_at_alpha_zero_with_sdpa_conventions():
    q, k, v = qkv()
    out = flash_prefill(q, k, v, scale=0.3, enable_gqa=True, config=SPARSE.replace(alpha=0.0))
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    assert out.shape == dense.shape and out.dtype == q.dtype
    assert_close(out, dense, 1e-5, 1e-5)


def test_short_sequences_run_dense():
    q, k, v = qkv(S=64)
    # alpha 1 with no sinks, window 1 and no dense rows drops blocks whenever sparse runs
    cfg = SPARSE.replace(alpha=1.0, min_seq_len=65, sink_blocks=0, window_blocks=1,
                         last_dense_blocks=0)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert_close(flash_prefill(q, k, v, enable_gqa=True, config=cfg), dense, 1e-6, 1e-6)
    sparse = flash_prefill(q, k, v, enable_gqa=True, config=cfg.replace(min_seq_len=0))
    assert not torch.allclose(sparse, dense, atol=1e-4), "alpha=1 should have dropped blocks"


def test_default_scale_is_sdpa_default():
    q, k, v = qkv(D=24)
    a = flash_prefill(q, k, v, enable_gqa=True, config=SPARSE.replace(alpha=0.3))
    b = flash_prefill(q, k, v, scale=1 / math.sqrt(24), enable_gqa=True,
                      config=SPARSE.replace(alpha=0.3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("case,exc,match", [
    ("rank", ValueError, "4-D"),
    ("int", TypeError, "floating"),
    ("dtype_mismatch", TypeError, "dtype"),
    ("gqa_without_flag", ValueError, "enable_gqa"),
    ("heads_not_multiple", ValueError, "multiple"),
    ("seq_mismatch", ValueError, "query has 100 tokens but key only 50"),
    ("head_dim", ValueError, "head dim"),
    ("batch", ValueError, "batch"),
    ("device", ValueError, "meta"),
])
def test_bad_input_raises_a_clear_error(case, exc, match):
    q, k, v = qkv()
    kwargs = {"enable_gqa": True, "config": SPARSE}
    if case == "rank":
        q = q[0]
    elif case == "int":
        q = q.to(torch.int32)
    elif case == "dtype_mismatch":
        k = k.double()
    elif case == "gqa_without_flag":
        kwargs["enable_gqa"] = False
    elif case == "heads_not_multiple":
        q = torch.cat([q, q[:, :1]], dim=1)
    elif case == "seq_mismatch":
        k, v = k[:, :, :50], v[:, :, :50]
    elif case == "head_dim":
        k = torch.cat([k, k], dim=-1)
    elif case == "batch":
        k, v = torch.cat([k, k]), torch.cat([v, v])
    elif case == "device":
        v = v.to("meta")
    with pytest.raises(exc, match=match):
        flash_prefill(q, k, v, **kwargs)


def test_nan_and_inf_inputs_behave_as_dense():
    q, k, v = qkv(S=96, dtype=torch.float64)
    q[0, 1, 50] = float("nan")
    k[0, 0, 20] = float("inf")
    out = flash_prefill(q, k, v, enable_gqa=True, config=SPARSE.replace(alpha=0.5))
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.equal(out.isnan(), dense.isnan())
    finite = ~dense.isnan()
    assert out[finite].isfinite().all()


def test_opcheck():
    q, k, v = qkv(S=40)
    for cfg in (SPARSE, SPARSE.replace(min_seq_len=1000)):
        torch.library.opcheck(torch.ops.fp_compile.flash_prefill.default,
                              (q, k, v, None, *op_config_args(cfg)))
    torch.library.opcheck(torch.ops.fp_compile.flash_prefill_eager.default,
                          (q, k, v, 0.2, *op_config_args(SPARSE)))


def test_opaque_op_refuses_backward_and_runs_without_grad():
    """Inputs that ask for a gradient: the forward runs and equals the no-grad one; a backward
    through the op fails, naming it (no gradient left silently missing). Under no_grad and
    inference_mode it runs as well."""
    q, k, v = qkv(S=40)
    args = (k, v, 0.2, *op_config_args(SPARSE))
    op = torch.ops.fp_compile.flash_prefill_eager
    with torch.no_grad():
        want = op(q, *args)
    with torch.inference_mode():
        assert torch.equal(op(q, *args), want)
    qg = q.clone().requires_grad_()
    out = op(qg, *args)
    assert out.requires_grad and torch.equal(out.detach(), want)
    with pytest.raises(RuntimeError, match="flash_prefill_eager has no backward"):
        out.sum().backward()
    out, lse = torch.ops.fp_compile.flash_prefill_lse(qg, *args)
    with pytest.raises(RuntimeError, match="flash_prefill_lse has no backward"):
        (out.sum() + lse.sum()).backward()


def test_select_blocks_density_and_block_mask():
    q, k, v = qkv(S=130, seed=4)
    sel = select_blocks(q, k, config=SPARSE.replace(alpha=0.5))
    M = sel.num_blocks
    assert M == 9 and sel.kv_num_blocks.shape == (1, 4, 9) and sel.kv_indices.shape == (1, 4, 9, 9)
    assert 0 < sel.density <= 1
    dense_mask = sel.to_dense()
    assert abs(sel.density - dense_mask.sum().item() / (4 * M * (M + 1) / 2)) < 1e-9
    bm = sel.to_block_mask()
    assert torch.equal(bm.to_dense().bool(), dense_mask)
    # Compiled FlexAttention on that BlockMask must compute what our op computes. (Eager
    # flex_attention's unfused path disagrees with both on partial last blocks, torch 2.13.)
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention)(q, k, v, block_mask=bm, enable_gqa=True)
    ours = flash_prefill(q, k, v, enable_gqa=True, config=SPARSE.replace(alpha=0.5))
    assert_close(flex, ours, 1e-5, 1e-5)


def test_public_names():
    for name in ("FlashPrefillConfig", "flash_prefill", "select_blocks", "BlockSelection"):
        assert hasattr(fp_compile, name)
    assert hasattr(torch.ops.fp_compile, "flash_prefill")
