"""The span dispatch (fp_compile/spans.py): the span built from a key mask and positions, its
errors, masked SDPA as ground truth, the op with a span against it, and merging by LSE."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fp_compile import FlashPrefillConfig, flash_prefill, spans
from fp_compile.kernels.utils import interpreting, span_visible
from tests.helpers import assert_close

EXACT = FlashPrefillConfig(alpha=0.0, block_size=16, min_seq_len=0)


def qkv(B=2, H=4, Hkv=2, S_q=40, S=70, D=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S_q, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    return q, k, v


def explicit(q, k, v, visible):
    """Softmax attention with a (B, S_q, S) visibility, written out; empty rows 0."""
    G = q.shape[1] // k.shape[1]
    kk, vv = (t.double().repeat_interleave(G, dim=1) for t in (k, v))
    logits = (q.double() @ kk.transpose(-1, -2)) / q.shape[-1] ** 0.5
    logits = logits.masked_fill(~visible[:, None], float("-inf"))
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return p @ vv


def test_span_of_padding_and_positions():
    q, k, _ = qkv(B=3)
    mask = torch.ones(3, 70, dtype=torch.int64)
    mask[1, :13] = 0                 # left padding
    mask[2, 50:] = 0                 # right padding
    span = spans.span_of(q, k, mask)
    assert span.p0.tolist() == [30] and span.ks.tolist() == [0, 13, 0]
    assert span.ke.tolist() == [70, 70, 50]
    empty = torch.zeros(3, 70, dtype=torch.bool)
    span = spans.span_of(q, k, empty)
    assert span.ks.tolist() == [0, 0, 0] and span.ke.tolist() == [0, 0, 0]
    span = spans.span_of(q, k, q_pos=torch.arange(5, 45))
    assert span.p0.tolist() == [5]


@pytest.mark.parametrize("case, match", [
    ("holes", "key_mask must mark one contiguous run"),
    ("gap_pos", "q_pos must be consecutive"),
    ("late_pos", "q_pos must be consecutive"),
    ("mask_shape", "key_mask must be"),
])
def test_span_errors_name_the_argument(case, match):
    q, k, v = qkv()
    kwargs = {}
    if case == "holes":
        mask = torch.ones(2, 70, dtype=torch.int64)
        mask[0, 20] = 0
        kwargs["key_mask"] = mask
    elif case == "gap_pos":
        kwargs["q_pos"] = torch.arange(40) * 2
    elif case == "late_pos":
        kwargs["q_pos"] = torch.arange(40) + 31          # past the 70 keys
    else:
        kwargs["key_mask"] = torch.ones(2, 69)
    with pytest.raises(ValueError, match=match):
        flash_prefill(q, k, v, enable_gqa=True, config=EXACT, **kwargs)


def test_masked_sdpa_is_the_visibility_rule():
    q, k, v = qkv(B=2, S_q=40, S=70)
    mask = torch.ones(2, 70, dtype=torch.int64)
    mask[1, :45] = 0                 # row 1: the first 15 queries see no key
    span = spans.span_of(q, k, mask)
    want = explicit(q, k, v, span_visible(span, 40, 70))
    got = spans.masked_sdpa(q, k, v, 0.25, span)
    assert_close(got, want, 1e-5, 1e-5)
    out, lse = spans.masked_sdpa(q, k, v, 0.25, span, return_lse=True)
    assert_close(out, want, 1e-5, 1e-5, "out with lse")
    assert torch.isneginf(lse[1, :, :15]).all() and torch.isfinite(lse[0]).all()


@pytest.mark.parametrize("kernel", ["reference", "triton"])
def test_merging_two_key_chunks_by_lse_equals_one_call(kernel):
    """Attention over keys [0, c) and over [c, S), merged with their LSEs, is one call."""
    if kernel == "triton" and not interpreting():
        pytest.skip("needs TRITON_INTERPRET=1")
    q, k, v = qkv(B=2, S_q=40, S=70)
    config = EXACT.replace(kernel=kernel)
    one, lse = flash_prefill(q, k, v, enable_gqa=True, config=config, return_lse=True)
    parts = []
    for lo, hi in ((0, 37), (37, 70)):
        mask = torch.zeros(2, 70, dtype=torch.int64)
        mask[:, lo:hi] = 1
        parts.append(flash_prefill(q, k, v, enable_gqa=True, config=config, key_mask=mask,
                                   return_lse=True))
    (o1, l1), (o2, l2) = parts
    total = torch.logaddexp(l1, l2)
    merged = (o1.float() * torch.exp(l1 - total)[..., None]
              + o2.float() * torch.exp(l2 - total)[..., None])
    assert_close(merged, one, 1e-4, 1e-4, "merged")
    assert_close(total, lse, 1e-4, 1e-4, "lse")
    assert_close(one, explicit(q, k, v, span_visible(spans.span_of(q, k), 40, 70)), 1e-4, 1e-4)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_op_with_a_span_equals_the_reference(data):
    """Any padding, offset, batch size, GQA ratio and block size: the op (Triton kernels in the
    interpreter where set, else the reference kernels) equals the plain-torch reference, and at
    alpha 0 equals masked SDPA."""
    B = data.draw(st.integers(1, 3), label="B")
    Hkv = data.draw(st.sampled_from([1, 2]), label="Hkv")
    G = data.draw(st.sampled_from([1, 2]), label="G")
    bs = data.draw(st.sampled_from([16, 32]), label="block_size")
    S = data.draw(st.integers(20, 120), label="S_kv")
    S_q = data.draw(st.integers(1, S), label="S_q")
    p0 = data.draw(st.integers(0, S - S_q), label="p0")
    mask = torch.zeros(B, S, dtype=torch.int64)
    for b in range(B):
        lo = data.draw(st.integers(0, S), label=f"ks{b}")
        hi = data.draw(st.integers(lo, S), label=f"ke{b}")
        mask[b, lo:hi] = 1
    alpha = data.draw(st.sampled_from([0.0, 0.1, 0.3]), label="alpha")
    floor = data.draw(st.sampled_from([0.0, 0.8]), label="mass_floor")
    q, k, v = qkv(B=B, H=Hkv * G, Hkv=Hkv, S_q=S_q, S=S, seed=S * 7 + S_q)
    config = FlashPrefillConfig(alpha=alpha, block_size=bs, min_seq_len=0, mass_floor=floor,
                                kernel="triton" if interpreting() else "reference")
    pos = torch.arange(p0, p0 + S_q)
    got = flash_prefill(q, k, v, enable_gqa=True, config=config, key_mask=mask, q_pos=pos)
    want = spans.reference(q, k, v, None, config, mask, pos)
    assert torch.isfinite(got).all()
    assert_close(got, want, 1e-4, 1e-4, "op vs reference")
    if alpha == 0:
        span = spans.span_of(q, k, mask, pos)
        assert_close(got, explicit(q, k, v, span_visible(span, S_q, S)), 1e-4, 1e-4, "vs SDPA")


# --------------------------------------------------------------------------------------- GPU

from tests.helpers import gpu, poison_next_cuda_alloc  # noqa: E402


def _left_padded(B, H, Hkv, S, D, lengths, dtype=torch.bfloat16, seed=0):
    q, k, v = (t.cuda() for t in qkv(B=B, H=H, Hkv=Hkv, S_q=S, S=S, D=D, seed=seed,
                                     dtype=dtype))
    mask = torch.zeros(B, S, dtype=torch.int64, device="cuda")
    for b, n in enumerate(lengths):
        mask[b, S - n:] = 1
    return q, k, v, mask


@gpu
def test_gpu_padded_batch_kernels_equal_reference_without_host_sync():
    q, k, v, mask = _left_padded(3, 8, 2, 4096, 128, [4096, 2500, 1000])
    config = FlashPrefillConfig(block_size=128, min_seq_len=0)
    want = spans.reference(q, k, v, None, config, mask)
    poison_next_cuda_alloc(q.shape, q.dtype)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")          # any device-to-host read raises
    try:
        got = flash_prefill(q, k, v, enable_gqa=True, config=config, key_mask=mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(got).all()
    assert_close(got, want, 2e-2, 2e-2, "padded batch")
    assert (got[2, :, :3096] == 0).all()             # rows before the prompt see no key


@gpu
def test_gpu_prefix_and_reduce_overhead_replay():
    """32 new blocks over a cached prefix, and a padded batch compiled with reduce-overhead
    (CUDA graphs): every replay with new masks and positions equals the reference."""
    q, k, v = (t.cuda() for t in qkv(B=1, H=8, Hkv=2, S_q=1500, S=4096, D=128,
                                     dtype=torch.bfloat16))
    config = FlashPrefillConfig(block_size=128, min_seq_len=0)
    got = flash_prefill(q, k, v, enable_gqa=True, config=config)
    assert_close(got, spans.reference(q, k, v, None, config), 2e-2, 2e-2, "prefix")

    def attend(q, k, v, mask, pos):
        return flash_prefill(q, k, v, enable_gqa=True, config=config, key_mask=mask, q_pos=pos)

    compiled = torch.compile(attend, mode="reduce-overhead", fullgraph=True)
    qb, kb, vb, _ = _left_padded(2, 8, 2, 2048, 128, [2048, 2048], seed=3)
    qb = qb[:, :, :1000].contiguous()
    for step, (ks, p0) in enumerate([(0, 1048), (700, 500), (1300, 0), (5, 1048)]):
        mask = torch.zeros(2, 2048, dtype=torch.int64, device="cuda")
        mask[0, ks:] = 1
        mask[1, :2048 - ks] = 1
        pos = torch.arange(p0, p0 + 1000, device="cuda")
        out = compiled(qb, kb, vb, mask, pos).clone()
        want = spans.reference(qb, kb, vb, None, config, mask, pos)
        assert_close(out, want, 2e-2, 2e-2, f"replay {step}")
