"""The Triton pattern search against its plain-torch definition (reference.py).

CPU: runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), small shapes,
fp32/fp16 only (bf16 dots are wrong in the interpreter). GPU-marked tests run long sequences.
"""

import functools
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fp_compile.kernels import utils as ku
from fp_compile.kernels.block_means import block_means, key_block_means
from fp_compile.kernels.pattern_search import pattern_search, pattern_search_reference
from fp_compile.demo.synthetic import planted_qkv
from tests.helpers import DEVICE, assert_close, gpu


def aligned_qk(B, H, Hkv, S, D, dtype, seed=0, device=DEVICE):
    """Random q/k plus a few key blocks' worth of keys aligned with a shared query direction.

    Random q/k alone give near-uniform block scores (every block kept at moderate alpha); the
    aligned keys give rows a few clear winners, so thresholds actually drop blocks.
    """
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S, D, generator=g)
    k = torch.randn(B, Hkv, S, D, generator=g)
    u = torch.randn(D, generator=g)
    u = u / u.norm()
    q += 2.0 * u  # every query leans on u
    heavy = torch.rand(B, Hkv, S, generator=g) < 0.08
    k += heavy[..., None] * (3.0 * math.sqrt(D)) * u
    return q.to(device, dtype), k.to(device, dtype)


def assert_same_selection(got, expected, max_diff_fraction=0.0):
    """Compact selections equal (up to a fraction of differing kept pairs) and well formed."""
    num, idx = got
    rnum, ridx = expected
    assert num.shape == rnum.shape and idx.shape == ridx.shape
    assert num.dtype == idx.dtype == torch.int32
    M = idx.shape[-1]
    slot = torch.arange(M, device=idx.device)
    used = slot < num[..., None]
    assert (idx[~used] == 0).all(), "unused kv_indices entries must be 0"
    nxt = torch.cat([idx[..., 1:], idx.new_full(idx.shape[:-1] + (1,), M)], dim=-1)
    assert ((nxt > idx) | ~used | ~(slot + 1 < num[..., None])).all(), "rows not ascending"
    keep, rkeep = ku.expand_indices(num, idx), ku.expand_indices(rnum, ridx)
    diff = keep != rkeep
    causal = num.numel() * (M + 1) // 2
    if max_diff_fraction == 0.0:
        if diff.any():
            where = diff.nonzero()[0].tolist()
            raise AssertionError(
                f"{int(diff.sum())} kept (query block, key block) pairs differ; first at "
                f"(b, h, i, j) = {where}: kernel keeps {bool(keep[tuple(where)])}")
        assert torch.equal(num, rnum) and torch.equal(idx, ridx)
    else:
        frac = diff.sum().item() / causal
        assert frac <= max_diff_fraction, f"{frac:.2e} of the causal block pairs differ"


def density(num, M):
    return num.sum().item() / (num.numel() * (M + 1) / 2)


# (B, H, Hkv, S, D, block_size, dtype, alpha, sink, window, last_dense, gqa_shared)
CASES = [
    (1, 1, 1, 100, 16, 16, torch.float32, 0.1, 1, 1, 0, False),
    (2, 4, 2, 200, 24, 16, torch.float32, 0.5, 2, 2, 1, False),   # D not a power of two
    (1, 4, 1, 150, 40, 16, torch.float16, 0.3, 1, 2, 1, True),    # GQA 4, shared
    (2, 2, 1, 130, 32, 32, torch.float16, 0.5, 0, 1, 0, False),   # no sinks, no dense rows
    (1, 2, 2, 300, 64, 16, torch.float32, 0.0, 2, 4, 2, False),   # alpha 0: every causal block
    (1, 4, 2, 250, 48, 16, torch.float32, 0.5, 1, 1, 2, True),    # shared, 2 groups
    (2, 2, 1, 20, 16, 32, torch.float32, 0.5, 1, 1, 0, False),    # S < block_size
    (1, 2, 1, 33, 16, 16, torch.float16, 1.0, 0, 1, 0, True),     # alpha 1: row max only
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}kv{}S{}D{}bs{}-{}-a{}-{}{}{}{}".format(
    *c[:6], str(c[6])[6:], *c[7:]))
def test_matches_reference_on_aligned_inputs(case):
    B, H, Hkv, S, D, bs, dtype, alpha, sink, window, last, shared = case
    q, k = aligned_qk(B, H, Hkv, S, D, dtype, seed=S + D)
    args = (q, k, 1 / math.sqrt(D), bs, alpha, sink, window, last)
    got = pattern_search(*args, gqa_shared=shared)
    expected = pattern_search_reference(*args, gqa_shared=shared)
    assert_same_selection(got, expected)
    M = ku.cdiv(S, bs)
    if alpha == 0.0:
        assert density(got[0], M) == 1.0


def test_selection_is_nontrivial_and_matches_on_planted_structure():
    q, k, _ = planted_qkv(1, 4, 2, 384, 32, seed=2, dtype=torch.float32, device=DEVICE)
    args = (q, k, 1 / math.sqrt(32), 16, 0.3, 1, 1, 1)
    for shared in (False, True):
        got = pattern_search(*args, gqa_shared=shared)
        assert_same_selection(got, pattern_search_reference(*args, gqa_shared=shared))
    assert density(got[0], 24) < 0.7, "the test input should make the threshold drop blocks"


def test_aligned_inputs_drop_blocks():
    # Guards the inputs of the parametrized test: they must not make selection trivial.
    q, k = aligned_qk(2, 4, 2, 200, 24, torch.float32, seed=224)
    num, _ = pattern_search(q, k, 1 / math.sqrt(24), 16, 0.5, 2, 2, 1)
    assert density(num, 13) < 0.8


@st.composite
def shapes(draw, max_blocks=4, head_dims=(16, 24, 40, 64)):
    """(B, H, Hkv, S, D, block): up to max_blocks blocks and a few rows more."""
    groups = draw(st.sampled_from([1, 2, 4]))
    kv_heads = draw(st.integers(1, 2))
    block = draw(st.sampled_from([16, 32]))
    seq = draw(st.integers(1, max_blocks * block + 5))
    head_dim = draw(st.sampled_from(list(head_dims)))
    batch = draw(st.integers(1, 2))
    return batch, kv_heads * groups, kv_heads, seq, head_dim, block


@settings(max_examples=12, deadline=None)
@given(shapes(), st.sampled_from([0.0, 0.1, 0.5, 0.9]), st.integers(0, 2), st.integers(1, 3),
       st.integers(0, 2), st.booleans(), st.sampled_from([torch.float32, torch.float16]),
       st.integers(0, 2**16))
@example((1, 1, 1, 1, 16, 16), 0.5, 1, 1, 0, False, torch.float32, 0)      # one token
@example((2, 8, 2, 47, 24, 16), 0.1, 0, 1, 0, True, torch.float16, 7)      # GQA 4, partial
def test_matches_reference_property(shape, alpha, sink, window, last, shared, dtype, seed):
    B, H, Hkv, S, D, bs = shape
    q, k = aligned_qk(B, H, Hkv, S, D, dtype, seed=seed)
    args = (q, k, 0.7 / math.sqrt(D), bs, alpha, sink, window, last)
    assert_same_selection(pattern_search(*args, gqa_shared=shared),
                          pattern_search_reference(*args, gqa_shared=shared))


def test_strided_inputs():
    # Models hand over q/k as (B, S, H, D) transposed views; never copied by the kernel.
    qs, ks = aligned_qk(1, 4, 2, 90, 32, torch.float32, seed=3)
    q = qs.transpose(1, 2).contiguous().transpose(1, 2)
    k = ks.transpose(1, 2).contiguous().transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    args = (q, k, 0.2, 16, 0.4, 1, 1, 0)
    assert_same_selection(pattern_search(*args), pattern_search_reference(*args))


def test_nan_scores_keep_blocks_like_the_reference():
    q, k = aligned_qk(1, 2, 1, 96, 16, torch.float32, seed=4)
    q[0, 1, 70] = float("nan")  # query block 4 of head 1: every score of its row is NaN
    args = (q, k, 0.25, 16, 0.9, 0, 1, 0)
    got = pattern_search(*args)
    assert_same_selection(got, pattern_search_reference(*args))
    assert got[0][0, 1, 4] == 5 and got[0][0, 0, 4] < 5
    q[0, 1, 70] = 1.0
    k[0, 0, 20] = float("nan")  # key block 1: a NaN score in every later row keeps those rows
    got = pattern_search(*args)
    assert_same_selection(got, pattern_search_reference(*args))
    assert torch.equal(got[0][0, :, 2:], torch.arange(3, 7, dtype=torch.int32).expand(2, 4))


def test_unused_entries_are_overwritten():
    # The output comes from torch.empty: every entry must be written, whatever was there.
    q, k = aligned_qk(1, 2, 2, 120, 16, torch.float32, seed=5)
    args = (q, k, 0.25, 16, 0.6, 1, 1, 0)
    expected = pattern_search_reference(*args)
    for _ in range(2):
        junk = torch.full((1 << 16,), -7, dtype=torch.int32, device=DEVICE)  # dirty the allocator
        del junk
        assert_same_selection(pattern_search(*args), expected)


@pytest.mark.parametrize("S,D,bs,dtype", [(100, 16, 16, torch.float32), (47, 40, 32, torch.float16),
                                          (5, 24, 16, torch.float32), (256, 64, 32, torch.float16),
                                          (300, 64, 128, torch.float16)])
def test_block_means(S, D, bs, dtype):
    """(300, 64, 128): two row chunks per block (block_size * D > 4096), a partial last one."""
    g = torch.Generator().manual_seed(S)
    k = (torch.randn(2, 3, S, D, generator=g) + 1.5).to(DEVICE, dtype)
    v = torch.randn(2, 3, S, D, generator=g).to(DEVICE, dtype)
    kmean = block_means(k, bs)
    assert kmean.dtype == torch.float32 and kmean.shape == (2, 3, ku.cdiv(S, bs), D)
    assert_close(kmean, key_block_means(k, bs), 1e-6, 1e-5, "kmean")
    km2, vmean = block_means(k.transpose(1, 2).contiguous().transpose(1, 2), bs, v)
    assert_close(km2, kmean, 1e-6, 1e-5, "kmean of strided k")
    assert_close(vmean, key_block_means(v, bs), 1e-6, 1e-5, "vmean")


@gpu
def test_traces_with_symbolic_shapes():
    # What torch.compile needs: no host sync, no data-dependent Python, SymInt-safe shapes.
    # (GPU only: under TRITON_INTERPRET=1 wrap_triton hands back the raw kernel, untraceable.)
    from torch.fx.experimental.proxy_tensor import make_fx

    q, k = aligned_qk(1, 4, 2, 100, 32, torch.float32, seed=6)
    fn = functools.partial(pattern_search, scale=0.2, block_size=16, alpha=0.3, sink_blocks=1,
                           window_blocks=2, last_dense_blocks=1, gqa_shared=True)
    gm = make_fx(fn, tracing_mode="symbolic")(q, k)
    assert "triton_kernel_wrapper" in gm.code
    q2, k2 = aligned_qk(1, 4, 2, 77, 32, torch.float32, seed=7)
    assert_same_selection(gm(q2, k2), pattern_search_reference(
        q2, k2, 0.2, 16, 0.3, 1, 2, 1, gqa_shared=True))


# ---------------------------------------------------------------------------- GPU (the lead runs)

GPU_CASES = [  # (H, Hkv, S, D, dtype, max differing fraction)
    (8, 2, 4096, 64, torch.bfloat16, 2e-3),
    (8, 8, 8192, 128, torch.float16, 1e-3),
    (4, 1, 16384, 128, torch.bfloat16, 2e-3),
    (4, 2, 4096, 80, torch.float32, 1e-5),
    (2, 2, 8191, 128, torch.float32, 1e-5),
]


@pytest.mark.parametrize("case", GPU_CASES, ids=str)
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("alpha", [0.12, 0.5])
@gpu
def test_gpu_matches_reference(case, shared, alpha):
    H, Hkv, S, D, dtype, tol = case
    q, k, _ = planted_qkv(1, H, Hkv, S, D, seed=S, dtype=dtype, device="cuda")
    args = (q, k, 1 / math.sqrt(D), 128, alpha, 2, 4, 2)
    got = pattern_search(*args, gqa_shared=shared)
    expected = pattern_search_reference(*args, gqa_shared=shared)
    assert_same_selection(got, expected, max_diff_fraction=tol)
    M = ku.cdiv(S, 128)
    assert density(got[0], M) < 0.9


@gpu
@pytest.mark.parametrize("block_size,D", [(64, 256), (128, 96), (32, 64)])
def test_gpu_block_sizes_and_head_dims(block_size, D):
    q, k, _ = planted_qkv(2, 4, 2, 3000, D, seed=1, dtype=torch.float16, device="cuda")
    args = (q, k, 1 / math.sqrt(D), block_size, 0.2, 1, 2, 1)
    assert_same_selection(pattern_search(*args), pattern_search_reference(*args),
                          max_diff_fraction=2e-3)


@gpu
def test_gpu_torch_compile():
    torch._dynamo.reset()
    q, k, _ = planted_qkv(1, 8, 2, 4096, 128, seed=5, dtype=torch.bfloat16, device="cuda")
    fn = functools.partial(pattern_search, scale=1 / math.sqrt(128), block_size=128, alpha=0.12,
                           sink_blocks=2, window_blocks=4, last_dense_blocks=2)
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    eager = fn(q, k)
    assert_same_selection(compiled(q, k), eager)
    q2, k2, _ = planted_qkv(1, 8, 2, 5000, 128, seed=6, dtype=torch.bfloat16, device="cuda")
    assert_same_selection(compiled(q2, k2), fn(q2, k2))  # one graph for both lengths


@gpu
def test_gpu_op_under_torch_compile_runs_the_kernel():
    from torch._inductor.utils import run_and_get_code

    import fp_compile  # noqa: F401  (registers the op)
    from fp_compile import FlashPrefillConfig, flash_prefill

    torch._dynamo.reset()
    # the paper's rule: no host decision, so the kernels are inlined into Inductor's code
    config = FlashPrefillConfig.paper_rule(min_seq_len=0, kernel="triton")
    q, k, v = planted_qkv(1, 8, 2, 4096, 128, seed=7, dtype=torch.bfloat16, device="cuda")

    def attend(q, k, v):
        return flash_prefill(q, k, v, enable_gqa=True, config=config)

    out, code = run_and_get_code(torch.compile(attend, fullgraph=True), q, k, v)
    assert "_pattern_search_kernel" in "\n".join(code)
    assert_close(out, attend(q, k, v), 2e-2, 2e-2, "compiled op vs eager op")


@pytest.mark.parametrize("shared", [False, True], ids=["per_head", "shared"])
@pytest.mark.parametrize("rows", [(0, 1, 13), (3, 3, 4), (12, 1, 1), (2, 5, 3)])
def test_a_subset_of_rows_equals_those_rows_of_the_whole_selection(rows, shared):
    # the dispatch's probe (strided rows) and its chunks (consecutive rows) use this
    q, k = aligned_qk(2, 4, 2, 200, 24, torch.float32, seed=3)
    args = (q, k, 24 ** -0.5, 16, 0.3, 1, 1, 1)
    num, idx, mass = pattern_search_reference(*args, gqa_shared=shared, mass_floor=0.8,
                                              return_mass=True)
    got_num, got_idx, got_mass = pattern_search(*args, gqa_shared=shared, mass_floor=0.8,
                                                return_mass=True, rows=rows)
    start, step, n = rows
    picked = torch.arange(start, start + step * n, step)
    assert got_num.shape == (2, 4, n) and got_idx.shape == (2, 4, n, 13)
    assert torch.equal(got_num, num[:, :, picked]) and torch.equal(got_idx, idx[:, :, picked])
    assert_close(got_mass, mass[:, :, picked], 1e-6, 1e-6)


@pytest.mark.parametrize("rows", [(0, 1, 14), (13, 1, 2), (-1, 1, 2), (0, 0, 3), (0, 1, 0)])
def test_rows_outside_the_query_blocks_are_refused(rows):
    q, k = aligned_qk(1, 2, 1, 200, 16, torch.float32)
    with pytest.raises(ValueError, match="rows="):
        pattern_search(q, k, 0.25, 16, 0.3, 1, 1, 1, rows=rows)


@pytest.mark.parametrize("S,D", [(600, 32), (590, 24)], ids=["S600-D32", "S590-D24-partial"])
@pytest.mark.parametrize("guard", [0.0, 0.8], ids=["paper", "mass_guard"])
def test_interior_tiles_take_the_unmasked_path_with_the_same_selection(S, D, guard):
    """fp16 rows of 38 key blocks cross interior tiles (TJ 16 in the interpreter) and a partial
    last one; both search variants give the reference's selection (and the same masses)."""
    from fp_compile.kernels import pattern_search as ps

    q, k = aligned_qk(1, 2, 1, S, D, torch.float16, seed=3)
    sel = (D ** -0.5, 16, 0.5, 1, 2, 1)
    extra = dict(mass_floor=guard, return_mass=True)
    expected = pattern_search_reference(q, k, *sel, **extra)
    for variant in ("full", "masked"):
        num, idx, mass = pattern_search(q, k, *sel, variant=variant, **extra)
        assert_same_selection((num, idx), expected[:2])
        assert_close(mass, expected[2], atol=1e-5, rtol=1e-4)
    if guard == 0.0:
        assert density(num, idx.shape[-1]) < 0.8, "the input should make the threshold drop blocks"
    with pytest.raises(ValueError, match="variant must be one of"):
        pattern_search(q, k, *sel, variant="fast")


# ------------------------------------------------------- strided search (config.search_stride)

def test_strided_reference_scores_every_nth_row_of_each_block():
    """block_scores_reference(row_stride=n) against a direct loop over blocks and their rows
    0, n, 2n, ... (a partial last block included), the scores normalised per row of blocks."""
    from fp_compile.kernels.search_reference import block_scores_reference

    bs, n, S, D = 32, 4, 150, 16
    q, k = aligned_qk(1, 2, 1, S, D, torch.float32, seed=5, device="cpu")
    kmean = key_block_means(k, bs)
    M = ku.cdiv(S, bs)
    got = block_scores_reference(q, kmean, 0.3, bs, 0, M, row_stride=n)
    for h in range(2):
        for i in range(1, M):
            rows = torch.arange(i * bs, min(S, (i + 1) * bs), n)
            logits = 0.3 * q[0, h, rows].double() @ kmean[0, 0, :i].double().T  # (rows, i)
            want = torch.exp(logits - logits.max()).sum(dim=0)
            row = got[0, h, i, :i].double()
            assert_close(row / row.sum(), want / want.sum(), atol=1e-6, rtol=1e-5)
            assert (got[0, h, i, i:] == 0).all()


@pytest.mark.parametrize("S,bs,stride,dtype", [(300, 32, 2, torch.float32),
                                               (290, 64, 4, torch.float16),
                                               (600, 32, 2, torch.float16),
                                               (130, 128, 8, torch.float32)],
                         ids=["fp32-bs32-n2", "fp16-bs64-n4-partial", "fp16-interior-n2",
                              "fp32-bs128-n8"])
@pytest.mark.parametrize("shared,guard", [(False, 0.0), (True, 0.0), (False, 0.8)],
                         ids=["per_head", "shared", "mass_guard"])
def test_strided_search_matches_the_strided_reference(S, bs, stride, dtype, shared, guard):
    q, k = aligned_qk(1, 4, 2, S, 32, dtype, seed=S + stride)
    sel = (32 ** -0.5, bs, 0.3, 1, 1, 1)
    extra = dict(gqa_shared=shared, mass_floor=guard, return_mass=True)
    num, idx, mass = pattern_search(q, k, *sel, row_stride=stride, **extra)
    expected = pattern_search_reference(q, k, *sel, row_stride=stride, **extra)
    assert_same_selection((num, idx), expected[:2])
    assert_close(mass, expected[2], atol=1e-5, rtol=1e-4)


def test_strided_search_reads_only_every_nth_row():
    """Even query rows point at key block 0, odd ones at key block 1: the full search keeps
    both, the stride-2 search (kernel and reference alike) sees only block 0."""
    bs, S, D = 32, 256, 32
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, S, D, generator=g) * 0.1
    k = torch.randn(1, 1, S, D, generator=g) * 0.1
    u, w = torch.eye(D)[:2]
    k[0, 0, :bs] += 4.0 * w                # key block 0 leans on w,
    k[0, 0, bs:2 * bs] += 4.0 * u          # key block 1 on u
    q[0, 0, 0::2] += 4.0 * w               # even query rows look for block 0,
    q[0, 0, 1::2] += 4.0 * u               # odd ones for block 1
    q, k = q.to(DEVICE), k.to(DEVICE)
    sel = (D ** -0.5, bs, 0.5, 0, 1, 0)
    full = ku.expand_indices(*pattern_search(q, k, *sel))
    strided = ku.expand_indices(*pattern_search(q, k, *sel, row_stride=2))
    ref = ku.expand_indices(*pattern_search_reference(q, k, *sel, row_stride=2))
    assert torch.equal(strided, ref)
    assert full[0, 0, 3:, :2].all(), "the full search should keep key blocks 0 and 1"
    assert strided[0, 0, 3:, 0].all()
    assert not strided[0, 0, 3:, 1].any(), "the strided search should not see key block 1"


@pytest.mark.parametrize("stride,bs", [(3, 64), (16, 128), (4, 32), (2, 16)])
def test_a_stride_leaving_fewer_than_16_rows_is_refused_naming_the_option(stride, bs):
    q, k = aligned_qk(1, 2, 1, 100, 16, torch.float32)
    for search in (pattern_search, pattern_search_reference):
        with pytest.raises(ValueError, match=r"FlashPrefillConfig\.search_stride"):
            search(q, k, 0.25, bs, 0.3, 1, 1, 1, row_stride=stride)


@gpu
@pytest.mark.parametrize("stride", [2, 4])
def test_gpu_strided_search_matches_reference(stride):
    q, k, _ = planted_qkv(1, 8, 2, 8192, 128, seed=3, dtype=torch.bfloat16, device="cuda")
    args = (q, k, 128 ** -0.5, 128, 0.12, 2, 4, 2)
    for guard in (0.0, 0.8):
        got = pattern_search(*args, mass_floor=guard, row_stride=stride)
        expected = pattern_search_reference(*args, mass_floor=guard, row_stride=stride)
        assert_same_selection(got, expected, max_diff_fraction=2e-3)
