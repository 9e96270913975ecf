"""cp_exchange: per-rank K/V counts and bytes on hand-made selections, counted by hand."""

import itertools

import pytest
import torch

from fp_compile.demo import cp_exchange as cx
from fp_compile.kernels.pattern_search import structural_keep

# block 2 tokens, D 4, one head, 2-byte K/V: a block's K+V = 2*2*4*2 = 32 bytes, a key mean
# 4*2 = 8 bytes; a pushed query block: q 2*4*2 = 16 out, out 16 + LSE 2*4 back = 24.
SHAPE = cx.Shape(block_size=2, head_dim=4, heads=1, kv_heads=1, dtype_bytes=2)


def _mask(rows, M=4):
    """(1, M, M) bool from {query block: kept key blocks}."""
    keep = torch.zeros(1, M, M, dtype=torch.bool)
    for i, js in rows.items():
        keep[0, i, list(js)] = True
    return keep


SINK_DIAG = {0: {0}, 1: {0, 1}, 2: {0, 2}, 3: {0, 3}}
# 8 blocks: sink + diagonal, and the last row dense
LAST_DENSE = {i: {0, i} for i in range(7)} | {7: set(range(8))}


def test_shardings():
    assert cx.contiguous(4, 2).owner().tolist() == [0, 0, 1, 1]
    assert cx.zigzag(4, 2).owner().tolist() == [0, 1, 1, 0]
    assert cx.zigzag(16, 4).owner().tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 3, 3, 2, 2, 1, 1, 0, 0]
    with pytest.raises(ValueError, match="equal chunks"):
        cx.zigzag(6, 2)


def test_dense_counts_by_hand():
    # block i holds 2*2*i + 2*3/2 = 4i + 3 causal pairs: 3, 7, 11, 15
    assert cx.dense_counts(cx.contiguous(4, 2), 2) == {
        "remote_all": [2, 2], "remote_causal": [0, 2], "causal_pairs": [10, 26]}
    assert cx.dense_counts(cx.zigzag(4, 2), 2) == {
        "remote_all": [2, 2], "remote_causal": [2, 1], "causal_pairs": [18, 18]}


@pytest.mark.parametrize("make", [cx.contiguous, cx.zigzag])
def test_sink_and_diagonal(make):
    # contiguous: rank 1 (rows 2, 3) needs block 0; zigzag: rank 1 (rows 1, 2) needs block 0.
    # Both rows are push candidates (1 of the 2 / 1 of the 1 blocks they see on rank 0), but
    # two pushes (2 * 40 bytes) cost more than one pulled block (32): nothing is pushed.
    c = cx.group_exchange(_mask(SINK_DIAG), make(4, 2), SHAPE, push_frac=0.5)
    assert c == {"pulled": [0, 1], "pushed_out": [0, 0], "pushed_in": [0, 0], "tiles": [3, 4]}


def test_bytes_by_hand_contiguous():
    sh = cx.contiguous(8, 2)                           # rank 0: blocks 0-3, rank 1: 4-7
    pull = cx.group_exchange(_mask(LAST_DENSE, 8), sh, SHAPE)
    push = cx.group_exchange(_mask(LAST_DENSE, 8), sh, SHAPE, push_frac=0.5)
    # pull: row 7 needs blocks 0-3 of rank 0. push: row 7 goes to rank 0 (40 bytes), rows 4-6
    # pull block 0 (32): 72 < 4 * 32; rank 0 computes row 7's 4 tiles there
    assert pull == {"pulled": [0, 4], "pushed_out": [0, 0], "pushed_in": [0, 0],
                    "tiles": [7, 14]}
    assert push == {"pulled": [0, 1], "pushed_out": [0, 1], "pushed_in": [1, 0],
                    "tiles": [11, 10]}
    t = cx.rank_traffic(sh, SHAPE, pull, push)
    assert t["ring_all"] == [128, 128] and t["ring_causal"] == [0, 128]
    assert t["means"] == [32, 32] and t["bitmap"] == [1, 1]
    assert t["sel_pull"] == [33, 161]                  # 0 / 4 blocks + 32 + 1
    assert t["sel_push"] == [49, 89]                   # q 16 + 33 / 32 + out 24 + 33
    assert t["ring_push"] == [144, 152]                # 128 + q 16 / 128 + out 24
    # the same with half the groups simulated: selection-aware block traffic doubles
    assert cx.rank_traffic(sh, SHAPE, pull, push, 2.0)["sel_pull"] == [33, 289]


def test_push_zigzag_by_hand():
    # rank 0 holds rows 0, 1, 6, 7; rank 1 rows 2-5. Row 7 keeps blocks 2-5, all on rank 1:
    # pushed there (40 < 4 * 32). Rows 2-5 each keep block 0 of rank 0: pushing all four
    # (160) would cost more than pulling block 0 once (32).
    sh = cx.zigzag(8, 2)
    push = cx.group_exchange(_mask(LAST_DENSE, 8), sh, SHAPE, push_frac=0.5)
    assert push == {"pulled": [0, 1], "pushed_out": [1, 0], "pushed_in": [0, 1],
                    "tiles": [9, 12]}
    pull = cx.group_exchange(_mask(LAST_DENSE, 8), sh, SHAPE)
    assert pull["pulled"] == [4, 1] and pull["tiles"] == [13, 8]


def test_group_union_counts_a_block_once():
    # head 0's row 2 keeps block 0, head 1's row 3 keeps blocks 0 and 1: rank 1 pulls 0 and 1
    keeps = torch.cat([_mask({2: {0, 2}}), _mask({3: {0, 1, 3}})])
    shape = cx.Shape(2, 4, heads=2, kv_heads=1)
    c = cx.group_exchange(keeps, cx.contiguous(4, 2), shape)
    assert c["pulled"] == [0, 2] and c["tiles"] == [0, 5]


@pytest.mark.parametrize("make,expected", [(cx.contiguous, [0, 3, 3, 3]),
                                           (cx.zigzag, [3, 6, 6, 3])])
def test_window_only_selection(make, expected):
    # window of 4 blocks (diagonal + 3 back), nothing else: each chunk start reaches 3 blocks
    # into the previous chunk; under zigzag chunk 2R-1-r follows chunk 2R-2-r of rank r + 1
    # (of rank r itself for r = R - 1)
    keep = structural_keep(32, 0, 32, 0, 4, 0, "cpu")[None]
    assert cx.group_exchange(keep, make(32, 4), SHAPE)["pulled"] == expected


def _naive_pulled(keeps, owner, R):
    need = [set() for _ in range(R)]
    for h, i, j in itertools.product(*map(range, keeps.shape)):
        if keeps[h, i, j] and owner[j] != owner[i]:
            need[owner[i]].add(j)
    return [len(n) for n in need]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("make", [cx.contiguous, cx.zigzag])
def test_pulled_matches_a_naive_count(seed, make):
    gen = torch.Generator().manual_seed(seed)
    M, R = 24, 3
    keeps = (torch.rand(2, M, M, generator=gen) < 0.2).tril()
    sh = make(M, R)
    c = cx.group_exchange(keeps, sh, cx.Shape(2, 4, 2, 1), push_frac=None)
    assert c["pulled"] == _naive_pulled(keeps, sh.owner().tolist(), R)
    assert sum(c["tiles"]) == int(keeps.sum())
    assert all(p <= n for p, n in zip(c["pulled"], cx.dense_counts(sh, 2)["remote_causal"]))


def test_times():
    sh = cx.contiguous(4, 2)
    c = cx.group_exchange(_mask(SINK_DIAG), sh, SHAPE)
    t = cx.rank_times(sh, SHAPE, c, c, 1.0, dense_tflops=1e-9, sparse_tflops=1e-9)
    # 1e-9 TFLOP/s = 1000 FLOP/s: ms = FLOPs; dense 4*D*H*pairs, sparse 4*D*b*b*tiles
    assert t["dense"] == pytest.approx([160, 416])
    assert t["sparse_pull"] == pytest.approx([16 * 4 * 3, 16 * 4 * 4])
    assert cx.comm_ms(450e9, 450.0) == pytest.approx(1000.0)
