"""cp_sim: real selections on a tiny planted input, reduced to per-rank traffic."""

import json

import pytest
import torch

from fp_compile import dispatch
from fp_compile.config import FlashPrefillConfig
from fp_compile.demo import cp_exchange as cx
from fp_compile.demo import cp_sim
from fp_compile.demo.synthetic import planted_qkv
from fp_compile.kernels import utils as ku


def test_keep_mask_matches_expand_indices():
    q, k, _ = planted_qkv(1, 2, 1, 1024, 32, seed=1)
    sel = dispatch.select(q, k, 32 ** -0.5, FlashPrefillConfig(block_size=32))
    want = ku.expand_indices(sel.num, sel.idx)
    for h in range(2):
        got = cp_sim.keep_mask(sel.num[0, h], sel.idx[0, h], rows_per_chunk=5)
        assert torch.equal(got, want[0, h])


@pytest.mark.parametrize("kernel", ["reference", "triton"])   # triton: the interpreter on CPU
def test_group_selection_is_the_ops_selection_head_by_head(kernel):
    q, k, _ = planted_qkv(1, 4, 1, 512, 32, seed=2)
    config = FlashPrefillConfig(block_size=32, kernel=kernel)
    keeps, num, times = cp_sim.group_selection(q, k, config)
    want = dispatch.select_mask(q, k, 32 ** -0.5, config)
    assert torch.equal(keeps, want[0]) and num.shape == (1, 4, 16) and len(times) == 4


SHAPE = cx.Shape(block_size=64, head_dim=32, heads=8, kv_heads=2)


@pytest.fixture(scope="module")
def rows():
    return cp_sim.simulate(2048, [2, 4], SHAPE, cp_sim.CONFIGS, "cpu", seed=0)


def test_rows_cover_every_case(rows):
    keys = {(r["config"], r["ranks"], r["sharding"]) for r in rows}
    assert keys == {(c, R, s) for c in ("default", "paper") for R in (2, 4)
                    for s in ("contiguous", "zigzag")}
    for r in rows:
        assert 0 < r["density"] <= 1
        assert r["below_min_seq_len"]                  # 2048 < min_seq_len 16384 (both)
        assert len(r["bytes"]["sel_pull"]) == r["ranks"]


def test_selection_aware_traffic_is_bounded_by_dense(rows):
    kvb = SHAPE.kv_block_bytes
    for r in rows:
        b = r["bytes"]
        sh = cx.SHARDINGS[r["sharding"]](32, r["ranks"])
        causal = cx.dense_counts(sh, 64)["remote_causal"]
        for rank in range(r["ranks"]):
            # K/V blocks pulled: never more than dense causal ring, per kv head
            assert r["pull_counts"]["pulled"][rank] <= causal[rank] * SHAPE.kv_heads
            assert r["push_counts"]["pulled"][rank] <= r["pull_counts"]["pulled"][rank]
            payload = b["sel_pull"][rank] - b["means"][rank] - b["bitmap"][rank]
            assert payload == r["pull_counts"]["pulled"][rank] * kvb <= b["ring_causal"][rank]
        # every selection keeps the dense last rows, so pull alone ships what ring does to the
        # owner of the last query block (+ means); pushes are taken only where they save bytes
        assert max(b["sel_pull"]) >= max(b["ring_causal"])
        assert sum(b["sel_push"]) <= sum(b["sel_pull"])
        # the work is the same wherever it runs
        assert sum(r["pull_counts"]["tiles"]) == sum(r["push_counts"]["tiles"])


def test_sample_groups_scales(rows):
    half = cp_sim.simulate(2048, [2], SHAPE, {"paper": FlashPrefillConfig.paper_rule}, "cpu",
                           sample_groups=1, seed=0)
    full = next(r for r in rows if (r["config"], r["ranks"], r["sharding"])
                == ("paper", 2, "contiguous"))
    assert half[0]["groups_simulated"] == 1
    assert half[0]["bytes"]["ring_all"] == full["bytes"]["ring_all"]
    # group 0 alone, doubled
    one = cp_sim.group_selection(*planted_qkv(1, 4, 1, 2048, 32, seed=0)[:2],
                                 FlashPrefillConfig.paper_rule(block_size=64))[0]
    pulled = cx.group_exchange(one, cx.contiguous(32, 2), SHAPE)["pulled"]
    sel = half[0]["bytes"]["sel_pull"]
    assert sel[1] == 2 * pulled[1] * SHAPE.kv_block_bytes + half[0]["bytes"]["means"][1] + \
        half[0]["bytes"]["bitmap"][1]


def test_cli_prints_tables_and_writes_json(tmp_path, capsys):
    out = tmp_path / "cp.json"
    cp_sim.main(["--seq-lens", "1024", "--ranks", "2", "--heads", "4", "--kv-heads", "2",
                 "--head-dim", "32", "--block-size", "64", "--configs", "paper",
                 "--json", str(out)])
    text = capsys.readouterr().out
    assert "| paper | 1024 | 2 | zigzag |" in text and "ring all GB" in text
    data = json.loads(out.read_text())
    assert data["settings"]["gbps"] == 450.0 and len(data["rows"]) == 2


def test_cli_rejects_uneven_sharding():
    with pytest.raises(ValueError, match="multiple of block_size"):
        cp_sim.main(["--seq-lens", "1000", "--ranks", "2", "--heads", "2", "--kv-heads", "1",
                     "--head-dim", "16", "--configs", "paper"])
