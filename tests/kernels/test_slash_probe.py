"""The slash probe (``kernels/slash_probe.py``): its scores against a brute force, the chunking
over heads, the offsets-to-blocks rule, and the planted slash lines found."""

import math

import pytest
import torch

from fp_compile.demo.synthetic import planted_qkv_with_info
from fp_compile.kernels import slash_probe as sp


def brute_scores(q, k, scale, n_rows=sp.PROBE_QUERY_ROWS):
    """Loops: per head h and offset o, the nanmedian over the probe rows r >= o of
    scale * q_r . k_{r - o} minus the mean of row r's visible logits."""
    B, H, S, _ = q.shape
    G = H // k.shape[1]
    rows = sp.probe_rows(S, n_rows)
    O = sp.n_offsets(rows)
    out = torch.empty(B, H, O, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            logits = scale * q[b, h, rows].double() @ k[b, h // G].double().T
            centred = [logits[p, :r + 1] - logits[p, :r + 1].mean() for p, r in enumerate(rows)]
            for o in range(O):
                vals = torch.stack([c[r - o] for c, r in zip(centred, rows) if r >= o])
                out[b, h, o] = vals.median()   # the lower median, as nanmedian
    return out


@pytest.mark.parametrize("median", sp.MEDIANS)
@pytest.mark.parametrize("S,H,Hkv,n_rows", [(96, 4, 2, 64), (131, 2, 1, 16), (40, 3, 3, 64)])
def test_scores_equal_the_brute_force(S, H, Hkv, n_rows, median):
    g = torch.Generator().manual_seed(S)
    q = torch.randn(2, H, S, 16, generator=g)
    k = torch.randn(2, Hkv, S, 16, generator=g)
    got = sp.slash_probe_scores(q, k, 0.3, n_rows, median=median)
    torch.testing.assert_close(got.double(), brute_scores(q, k, 0.3, n_rows), atol=1e-5,
                               rtol=1e-5)
    assert got.dtype == torch.float32
    assert sp.slash_probe_scores(q.double(), k.double(), 0.3, n_rows).dtype == torch.float64
    assert torch.equal(got, sp.slash_probe_scores(q, k, 0.3, n_rows, median=sp.MEDIANS[0]))
    with pytest.raises(ValueError, match="median must be one of"):
        sp.slash_probe_scores(q, k, 0.3, n_rows, median="mean")


def test_rows_and_offsets():
    rows = sp.probe_rows(8192)
    assert len(rows) == 64 and rows[0] == 4096 and rows[-1] == 8191
    assert rows == sorted(set(rows))
    assert sp.probe_rows(10) == [5, 6, 7, 8, 9] and sp.probe_rows(1) == [0]
    # offsets seen by at least half of the rows
    for rows in (sp.probe_rows(8192), [5, 6, 7, 8, 9], [0], [3, 4]):
        O = sp.n_offsets(rows)
        assert sum(r >= O - 1 for r in rows) >= len(rows) / 2
        assert sum(r >= O for r in rows) < len(rows) / 2


def test_chunks_over_heads_change_nothing(monkeypatch):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, 200, 16, generator=g)
    k = torch.randn(1, 4, 200, 16, generator=g)
    whole = sp.slash_probe_scores(q, k, 0.25)
    monkeypatch.setattr(sp, "PROBE_BYTES", 1)        # one kv head per chunk
    assert torch.equal(sp.slash_probe_scores(q, k, 0.25), whole)


def test_offsets_to_blocks():
    heavy = torch.zeros(1, 4, 70, dtype=torch.bool)
    heavy[0, 0, 0] = True      # the diagonal block only
    heavy[0, 1, 16] = True     # o = bs: block offset 1 only
    heavy[0, 2, 19] = True     # o = bs + 3: rows of a query block reach block offsets 1 and 2
    heavy[0, 3, 63] = True     # the last offset block: nothing beyond M
    blocks = sp.offset_blocks(heavy, 16, 4)
    want = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(blocks[0], want)


def test_flags_shape_and_no_columns():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 300, 16, generator=g)
    k = torch.randn(1, 1, 300, 16, generator=g)
    column, diagonal = sp.slash_probe_flags(q, k, 0.25, 32, 3.0)
    assert column.shape == diagonal.shape == (1, 2, 10)
    assert column.dtype == diagonal.dtype == torch.bool and not column.any()
    # kappa 0 flags every offset at or above the head's median: about half the offsets
    heavy = sp.slash_probe_offsets(q, k, 0.25, 0.0)
    assert 0.45 < heavy.float().mean() < 0.6
    # non-finite inputs flag nothing rather than raising
    assert not sp.slash_probe_flags(q * math.nan, k, 0.25, 32, 3.0)[1].any()


def test_finds_the_planted_slash_lines():
    # the study's setting (8K, H 8, Hkv 2, D 128): every planted offset's blocks are flagged on
    # the slash heads, and the probe adds little elsewhere
    S, bs = 8192, 128
    q, k, _, info = planted_qkv_with_info(1, 8, 2, S, 128, seed=0, strength=1.0)
    column, diagonal = sp.slash_probe_flags(q, k, 128 ** -0.5, bs, 6.0)
    slash = [h for h, kind in enumerate(info["kinds"]) if kind == "slash"]
    assert slash and not column.any()
    for h in slash:
        for o in info["offsets"]:
            assert diagonal[0, h, o // bs], (h, o)
            if o % bs:
                assert diagonal[0, h, o // bs + 1], (h, o)
    assert diagonal.float().mean() < 0.1


def test_traces_with_fake_tensors():
    # the op's body (the probe with it) is traced when compiled with a static length: nothing
    # may read a tensor's values on the host
    from torch.fx.experimental.proxy_tensor import make_fx

    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 256, 16, generator=g)
    k = torch.randn(1, 2, 256, 16, generator=g)
    def probe(median):
        return lambda q, k: sp.slash_probe_flags(q, k, 0.25, 32, 3.0, median=median)

    for median in sp.MEDIANS:
        gm = make_fx(probe(median), tracing_mode="fake")(q, k)
        got, want = gm(q, k), sp.slash_probe_flags(q, k, 0.25, 32, 3.0, median=median)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("S", [1, 2, 7, 100, 129, 8192, 131072])
def test_device_rows_equal_the_host_rows(S):
    rows = sp.probe_rows(S)
    assert sp.device_rows(rows, "cpu").tolist() == rows
