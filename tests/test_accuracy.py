"""Attention recall, the vertical/slash detector, and calibration, against brute force."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fp_compile
from fp_compile import FlashPrefillConfig, select_blocks
from fp_compile import accuracy as acc
from fp_compile.kernels import utils as ku
from fp_compile.kernels.block_sparse_attention import block_sparse_attention_reference
from fp_compile.kernels.pattern_search import select_mask_reference
from fp_compile.kernels.vertical_slash import (add_vertical_slash,
                                              vertical_slash_flags_reference,
                                              vertical_slash_scores_reference)
from fp_compile.demo.synthetic import planted_qkv
from fp_compile.ops import OP_CONFIG_FIELDS, op_config_args
from tests.helpers import assert_close, flash_prefill_reference


def brute_probs(q, k, scale):
    """(B, H, S, S) exact causal softmax, k repeated per group: the tiny-shape ground truth."""
    kk = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    S = q.shape[2]
    logits = scale * q.double() @ kk.double().transpose(-1, -2)
    logits = logits.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(logits, dim=-1)


def brute_recall(q, k, keep, scale, bs):
    p = brute_probs(q, k, scale)
    S = q.shape[2]
    blk = torch.arange(S) // bs
    inside = keep[:, :, blk][..., blk]
    return (p * inside).sum(-1).mean().item()


@pytest.mark.parametrize("B,H,Hkv,S,D,bs", [(1, 4, 2, 100, 32, 16), (2, 3, 1, 67, 16, 32),
                                            (1, 2, 2, 16, 64, 16)])
def test_recall_matches_brute_force(B, H, Hkv, S, D, bs):
    q, k, _ = planted_qkv(B, H, Hkv, S, D, seed=1)
    cfg = FlashPrefillConfig(block_size=bs, alpha=0.5, sink_blocks=1, window_blocks=1,
                             last_dense_blocks=0, kernel="reference")
    sel = select_blocks(q, k, config=cfg)
    expected = brute_recall(q, k, sel.to_dense(), 1 / math.sqrt(D), bs)
    assert abs(sel.recall(q, k) - expected) < 1e-5
    assert sel.recall(q, k) < 1.0 or sel.density == 1.0


def test_recall_is_one_at_alpha_zero_and_rows_subset():
    q, k, _ = planted_qkv(1, 4, 2, 150, 32, seed=2)
    sel = select_blocks(q, k, config=FlashPrefillConfig(block_size=16, alpha=0.0))
    assert abs(sel.recall(q, k, scale=0.2) - 1.0) < 1e-6
    keep = torch.rand(1, 4, 10, 10, generator=torch.Generator().manual_seed(0)) > 0.5
    rows = torch.tensor([3, 77, 149])
    per_head = acc.mask_recall(q, k, keep, 0.2, 16, rows)
    p = brute_probs(q, k, 0.2)
    blk = torch.arange(150) // 16
    inside = keep[:, :, blk][..., blk]
    expected = (p * inside).sum(-1)[:, :, rows].mean(-1)
    assert_close(per_head, expected, 1e-6, 1e-6, "per-head recall")


def test_sparse_and_dense_rows_match_reference():
    q, k, v = planted_qkv(1, 4, 2, 90, 32, seed=3, dtype=torch.float64)
    keep = select_mask_reference(q, k, 0.2, 16, 0.3, 1, 1, 0)
    num, idx = ku.compact_mask(keep)
    rows = torch.tensor([0, 40, 89])
    for mc in (False, True):
        out = block_sparse_attention_reference(q, k, v, num, idx, 0.2, 16, mean_correction=mc)
        sp, de = acc.sparse_and_dense_rows(q, k, v, keep, 0.2, 16, rows, mean_correction=mc)
        assert_close(sp, out[:, :, rows], 1e-10, 1e-10, "sparse rows")
        dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.2, enable_gqa=True)
        assert_close(de, dense[:, :, rows], 1e-10, 1e-10, "dense rows")


@pytest.mark.parametrize("S,bs", [(100, 16), (64, 32), (70, 64), (5, 16)])
def test_vertical_slash_scores_brute_force(S, bs):
    q, k, _ = planted_qkv(2, 4, 2, S, 32, seed=4, dtype=torch.float64)
    col, diag = vertical_slash_scores_reference(q, k, 0.3, bs)
    p = brute_probs(q, k, 0.3)
    M = -(-S // bs)
    rows = list(range((M - 1) * bs, S))
    R = len(rows)
    assert_close(col, p[:, :, rows].mean(-2), 1e-12, 1e-12, "column scores")
    # diagonal o: min over the two halves of the rows of mean(p[r, r-o] - col[r-o])
    exp = torch.zeros_like(diag)
    half = max(1, R // 2)
    for o in range(S):
        terms = [(p[:, :, r, r - o] - col[:, :, r - o]) if r - o >= 0 else torch.zeros(2, 4,
                 dtype=torch.float64) for r in rows]
        t = torch.stack(terms, -1)
        if R == 1:
            exp[..., o] = t[..., 0]
        else:
            exp[..., o] = torch.minimum(t[..., :half].sum(-1), t[..., half:].sum(-1)) * 2 / R
    assert_close(diag, exp, 1e-12, 1e-12, "diagonal scores")


def test_vertical_slash_flags_and_addition():
    bs, S = 16, 160
    M = S // bs
    q, k, _ = planted_qkv(1, 2, 1, S, 32, seed=5, dtype=torch.float64)
    col, diag = vertical_slash_scores_reference(q, k, 0.2, bs)
    cb, db = vertical_slash_flags_reference(q, k, 0.2, bs, 0.01)
    for h in range(2):
        for j in range(M):
            assert cb[0, h, j] == (col[0, h, j * bs:(j + 1) * bs] >= 0.01).any()
        heavy = (diag[0, h] >= 0.01).nonzero().flatten().tolist()
        want = set()
        for o in heavy:
            want.add(o // bs)
            if o % bs:
                want.add(o // bs + 1)
        assert set(db[0, h].nonzero().flatten().tolist()) == {d for d in want if d < M}
    keep = select_mask_reference(q, k, 0.2, bs, 0.5, 1, 1, 0)
    added = add_vertical_slash(keep, cb, db)
    for i in range(M):
        for j in range(M):
            extra = j <= i and bool(cb[0, 0, j] or db[0, 0, i - j])
            assert added[0, 0, i, j] == (keep[0, 0, i, j] or extra)
    # the option in select_mask_reference is exactly this addition
    full = select_mask_reference(q, k, 0.2, bs, 0.5, 1, 1, 0, vertical_slash=True,
                                     vs_threshold=0.01)
    assert torch.equal(full, added)


def test_vertical_slash_finds_planted_columns():
    """A heavy single key that block means dilute is added for every later query block."""
    torch.manual_seed(0)
    B, H, S, D, bs = 1, 1, 512, 32, 32
    q = 0.3 * torch.randn(B, H, S, D)
    k = 0.3 * torch.randn(B, H, S, D)
    q[..., 0] = 1.0
    k[..., 0] = 0.0
    k[0, 0, 200, 0] = (math.log(S) + 2) * math.sqrt(D)  # logit log S + 2: a heavy column
    k[0, 0, 40:60, 0] = 4 * math.sqrt(D)  # a salient span sets the row max of block scores
    paper = select_mask_reference(q, k, 1 / math.sqrt(D), bs, 0.12, 1, 1, 1)
    vs = select_mask_reference(q, k, 1 / math.sqrt(D), bs, 0.12, 1, 1, 1,
                                   vertical_slash=True, vs_threshold=0.015)
    j = 200 // bs
    assert not paper[0, 0, j + 2: -1, j].all()
    assert vs[0, 0, j:, j].all()


def test_paper_rule_turns_vertical_slash_off():
    cfg = FlashPrefillConfig.paper_rule(alpha=0.1)
    assert cfg.vertical_slash is False and cfg.mean_correction is False
    with pytest.raises(ValueError, match="vs_threshold"):
        FlashPrefillConfig(vs_threshold=2.0)


def test_op_with_vertical_slash_matches_reference():
    q, k, v = planted_qkv(1, 4, 2, 130, 32, seed=7)
    cfg = FlashPrefillConfig(block_size=16, alpha=0.3, sink_blocks=1, window_blocks=1,
                             last_dense_blocks=0, min_seq_len=0, kernel="reference",
                             vertical_slash=True, vs_threshold=0.01)
    out = fp_compile.flash_prefill(q, k, v, enable_gqa=True, config=cfg)
    want = flash_prefill_reference(q, k, v, 1 / math.sqrt(32), 16, 0.3, 1, 1, 0, 0,
                                       vertical_slash=True, vs_threshold=0.01)
    assert_close(out, want, 1e-6, 1e-6)


def test_op_with_a_last_rows_probe_matches_reference():
    """vs_rows reaches the op (its schema's last field) and the reference's probe; a program
    saved before the field existed (no vs_rows argument) runs the last-block probe."""
    q, k, v = planted_qkv(1, 4, 2, 200, 32, seed=7)
    options = dict(vertical_slash=True, vs_threshold=0.01, vs_rows=32, dense_above=1.0)
    cfg = FlashPrefillConfig(block_size=16, alpha=0.3, sink_blocks=1, window_blocks=1,
                             last_dense_blocks=0, min_seq_len=0, kernel="reference", **options)
    at = OP_CONFIG_FIELDS.index("vs_rows")
    assert op_config_args(cfg)[at] == 32
    out = fp_compile.flash_prefill(q, k, v, enable_gqa=True, config=cfg)
    want = flash_prefill_reference(q, k, v, 1 / math.sqrt(32), 16, 0.3, 1, 1, 0, 0, **options)
    assert_close(out, want, 1e-6, 1e-6)
    block = fp_compile.flash_prefill(q, k, v, enable_gqa=True, config=cfg.replace(vs_rows=0))
    assert not torch.equal(out, block), "32 probe rows should select differently here"
    old = torch.ops.fp_compile.flash_prefill(q, k, v, None, *op_config_args(cfg)[:at])
    assert torch.equal(old, block)
    with pytest.raises(ValueError, match=r"FlashPrefillConfig\.vs_rows"):
        FlashPrefillConfig(vs_rows=129)


@pytest.mark.parametrize("kernel", ["reference", "triton"])
def test_op_with_a_strided_search_matches_reference(kernel):
    """search_stride reaches the op (a field of its schema) and the selection: the
    op equals the plain-torch op with the same stride, its blocks are the strided reference's,
    and a program saved before the field existed scores every row."""
    if kernel == "triton" and not (ku.interpreting() or torch.cuda.is_available()):
        pytest.skip("the Triton search needs TRITON_INTERPRET=1 or a GPU")
    q, k, v = planted_qkv(1, 4, 2, 400, 32, seed=11)
    cfg = FlashPrefillConfig(block_size=32, alpha=0.3, sink_blocks=1, window_blocks=1,
                             last_dense_blocks=0, min_seq_len=0, kernel=kernel,
                             vertical_slash=False, dense_above=1.0, search_stride=2)
    at = OP_CONFIG_FIELDS.index("search_stride")
    assert op_config_args(cfg)[at] == 2
    out = fp_compile.flash_prefill(q, k, v, enable_gqa=True, config=cfg)
    want = flash_prefill_reference(q, k, v, 1 / math.sqrt(32), 32, 0.3, 1, 1, 0, 0,
                                   vertical_slash=False, dense_above=1.0, search_stride=2)
    assert_close(out, want, 1e-5, 1e-5)
    keep = select_mask_reference(q, k, 1 / math.sqrt(32), 32, 0.3, 1, 1, 0, mass_floor=0.8,
                                 search_stride=2)
    sel = select_blocks(q, k, config=cfg)
    assert torch.equal(ku.expand_indices(sel.kv_num_blocks, sel.kv_indices), keep)
    full = fp_compile.flash_prefill(q, k, v, enable_gqa=True, config=cfg.replace(search_stride=1))
    assert not torch.equal(out, full), "stride 2 should select differently here"
    old = torch.ops.fp_compile.flash_prefill(q, k, v, None, *op_config_args(cfg)[:at])
    assert torch.equal(old, full)


class TinyAttentionModel(nn.Module):
    """Two attention layers over planted q/k/v (the first sharper than the second)."""

    def __init__(self, D=32):
        super().__init__()
        self.D = D

    def forward(self, q, k, v):
        o1 = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        # a non-causal call in between is not a prefill layer, but still counts in numbering
        F.scaled_dot_product_attention(q[:, :, :4], k[:, :, :4], v[:, :, :4])
        o2 = F.scaled_dot_product_attention(0.3 * q, k, v, is_causal=True)
        return o1 + o2


def test_calibrate_picks_largest_alpha_meeting_target():
    samples = [planted_qkv(1, 2, 2, 256, 32, seed=s) for s in (0, 1)]
    alphas = (0.5, 0.2, 0.05, 0.0)
    base = FlashPrefillConfig.paper_rule(block_size=16, sink_blocks=1, window_blocks=1, last_dense_blocks=0)
    cfg, report = fp_compile.calibrate(TinyAttentionModel(), samples, target_recall=0.97,
                                       alphas=alphas, config=base)
    assert [r.layer for r in report.layers] == [0, 2]
    assert dict(cfg.layer_alpha) == {r.layer: r.alpha for r in report.layers}
    for r in report.layers:
        assert r.recall >= 0.97 and r.met
        scales = {0: 1.0, 2: 0.3}
        # brute force: recall at each alpha on the grid, averaged over the samples
        def recall_at(a):
            vals = []
            for q, k, _ in samples:
                keep = select_mask_reference(scales[r.layer] * q, k, 1 / math.sqrt(32), 16, a,
                                                 1, 1, 0)
                vals.append(brute_recall(scales[r.layer] * q, k, keep, 1 / math.sqrt(32), 16))
            return sum(vals) / len(vals)
        assert abs(recall_at(r.alpha) - r.recall) < 1e-5
        larger = [a for a in alphas if a > r.alpha]
        assert all(recall_at(a) < 0.97 for a in larger)
    assert "0.97" in str(report) and "target missed" not in str(report)


class MaskFromSizesModel(nn.Module):
    """Builds its causal mask from sizes (as Hugging Face models do while dynamo traces) and
    passes it with is_causal=False: the pass folds it, so calibrate must measure it too."""

    def forward(self, q, k, v):
        S = q.shape[2]
        mask = torch.arange(S)[None, :] <= torch.arange(S)[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_calibrate_sees_the_calls_the_pass_rewrites_through_a_causal_mask():
    samples = [planted_qkv(1, 2, 2, 256, 32, seed=0)]
    base = FlashPrefillConfig(block_size=16, sink_blocks=1, window_blocks=1, last_dense_blocks=0)
    model = MaskFromSizesModel()
    with torch.no_grad():
        explained = fp_compile.explain(model, *samples[0], config=base)
    assert [r.layer for r in explained.rewritten] == [0], explained
    cfg, report = fp_compile.calibrate(model, samples, target_recall=0.9,
                                       alphas=(0.5, 0.1, 0.0), config=base)
    assert [r.layer for r in report.layers] == [0], report
    assert [layer for layer, _ in cfg.layer_alpha] == [0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_vertical_slash_selection_on_gpu_matches_cpu():
    q, k, _ = planted_qkv(1, 8, 2, 4096, 128, seed=0)
    cfg = FlashPrefillConfig(vertical_slash=True, kernel="reference")
    cpu = select_blocks(q, k, config=cfg)
    gpu = select_blocks(q.cuda(), k.cuda(), config=cfg.replace(kernel="auto"))
    assert abs(gpu.density - cpu.density) < 0.01
    assert abs(gpu.recall(q.cuda(), k.cuda()) - cpu.recall(q, k)) < 0.01
