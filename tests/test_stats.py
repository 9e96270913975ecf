"""collect_stats: per-layer, per-head density recorded by the op; nothing recorded when off;
the ``fp_compile`` logger."""

import logging

import pytest
import torch

import fp_compile
from fp_compile import FlashPrefillConfig, select_blocks
from fp_compile.ops import op_config_args
from fp_compile.demo.synthetic import planted_qkv


@pytest.fixture(autouse=True)
def _clean_stats():
    fp_compile.reset_stats()
    yield
    fp_compile.reset_stats()


def _op(q, k, v, config, layer):
    return torch.ops.fp_compile.flash_prefill(q, k, v, None, *op_config_args(config), layer=layer)


def test_stats_record_per_layer_per_head_density():
    q, k, v = planted_qkv(2, 8, 2, 300, 32, seed=5)   # S not a multiple of the block
    cfg = FlashPrefillConfig(block_size=16, min_seq_len=0, alpha=0.3, collect_stats=True)
    for layer in (0, 1, 0, 1):                         # two prefills of a two-layer model
        _op(q, k, v, cfg, layer)
    table = fp_compile.stats()
    assert [(r.prefill, r.layer) for r in table] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    sel = select_blocks(q, k, config=cfg)
    M = sel.num_blocks
    expected = (sel.kv_num_blocks.double().sum(-1).mean(0) / (M * (M + 1) / 2)).tolist()
    row = table[0]
    assert row.sparse and row.seq_len == 300 and row.batch == 2 and len(row.head_density) == 8
    assert row.head_density == pytest.approx(expected)
    assert row.density == pytest.approx(sel.density)
    assert min(row.head_density) < 1.0                 # planted structure: something skipped
    assert set(table.by_layer()) == {0, 1}
    text = str(table)
    assert "density" in text and "sparse" in text
    assert len(table.as_dicts()) == 4


def test_short_prompt_is_recorded_as_dense():
    q, k, v = planted_qkv(1, 4, 4, 40, 16, seed=6)
    _op(q, k, v, FlashPrefillConfig(block_size=16, min_seq_len=64, collect_stats=True), 3)
    (row,) = fp_compile.stats().rows
    assert not row.sparse and row.layer == 3 and row.head_density == (1.0,) * 4


def test_nothing_recorded_when_off():
    q, k, v = planted_qkv(1, 4, 2, 64, 16, seed=7)
    out = _op(q, k, v, FlashPrefillConfig(block_size=16, min_seq_len=0), 0)
    assert out.shape == q.shape
    assert len(fp_compile.stats()) == 0
    assert "no FlashPrefill stats" in str(fp_compile.stats())


def test_collect_stats_does_not_change_the_output():
    q, k, v = planted_qkv(1, 4, 2, 200, 32, seed=8)
    cfg = FlashPrefillConfig(block_size=16, min_seq_len=0, alpha=0.4)
    a = _op(q, k, v, cfg, 0)
    b = _op(q, k, v, cfg.replace(collect_stats=True), 0)
    assert torch.equal(a, b)


def test_reset_clears(caplog):
    q, k, v = planted_qkv(1, 4, 2, 64, 16, seed=9)
    with caplog.at_level(logging.DEBUG, logger="fp_compile"):
        _op(q, k, v, FlashPrefillConfig(block_size=16, min_seq_len=0, collect_stats=True), 2)
    assert any(r.name == "fp_compile" and "layer 2" in r.getMessage() for r in caplog.records)
    assert len(fp_compile.stats()) == 1
    fp_compile.reset_stats()
    assert len(fp_compile.stats()) == 0


def test_rows_name_the_options_a_call_ran_with():
    q, k, v = planted_qkv(1, 4, 2, 128, 16, seed=8)
    base = dict(block_size=16, min_seq_len=0, collect_stats=True)
    _op(q, k, v, FlashPrefillConfig(**base), 0)
    _op(q, k, v, FlashPrefillConfig.paper_rule(**base), 1)
    _op(q, k, v, FlashPrefillConfig.paper_rule(**base, vertical_slash=True), 2)
    rows = fp_compile.stats().rows
    assert [r.options for r in rows] == ["vertical_slash, mass_floor=0.8, dense_above=0.6", "",
                                         "vertical_slash"]
    text = str(fp_compile.stats())
    assert "(vertical_slash, mass_floor=0.8, dense_above=0.6)" in text and "(paper rule)" in text
    assert fp_compile.stats().as_dicts()[2]["options"] == "vertical_slash"
