"""Test helpers shared by the test modules."""

import pytest
import torch

# Marks a test that needs a CUDA GPU; tests/conftest.py skips it when there is none.
gpu = pytest.mark.gpu
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def poison_next_cuda_alloc(shape, dtype) -> None:
    """Fill CUDA memory with NaN and free it: an output allocated next with the same size reuses
    it, so elements a kernel fails to write show up as non-finite."""
    poison = torch.full(shape, float("nan"), device="cuda", dtype=dtype)
    del poison


def spy_calls(monkeypatch, module, name: str, record=lambda args, kwargs: args[0].shape) -> list:
    """Replace ``module.name`` by a wrapper that calls it and appends ``record(args, kwargs)``
    (by default the first argument's shape) to the returned list, one entry per call."""
    calls, real = [], getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(record(args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float,
                 what: str = "output") -> None:
    """allclose with a report of where and by how much the values differ."""
    actual, expected = actual.double(), expected.double()
    diff = (actual - expected).abs()
    bad = ~(diff <= atol + rtol * expected.abs())
    bad |= actual.isnan() != expected.isnan()
    if bad.any():
        where = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements differ; max abs diff "
            f"{diff.nan_to_num(float('inf')).max().item():.3e} (atol {atol}, rtol {rtol}); "
            f"first at index {where}: got {actual[tuple(where)].item():.6g}, expected "
            f"{expected[tuple(where)].item():.6g}")


def flash_prefill_reference(q, k, v, scale, block_size, alpha, sink_blocks, window_blocks,
                            last_dense_blocks, min_seq_len, **options) -> torch.Tensor:
    """The whole op in plain torch (``dispatch.reference``) with the config given field by field."""
    from fp_compile import FlashPrefillConfig, dispatch

    config = FlashPrefillConfig(block_size=block_size, alpha=alpha, sink_blocks=sink_blocks,
                                window_blocks=window_blocks, last_dense_blocks=last_dense_blocks,
                                min_seq_len=min_seq_len, **options)
    return dispatch.reference(q, k, v, scale, config)


def assert_select_equals_reference(q, k, scale, config):
    """The dispatch's Triton selection (``dispatch.select``) equals the plain-torch reference's
    (kept blocks bit for bit, estimated kept mass to 1e-6); returns (the Triton selection, the
    reference's keep mask (B, H, M, M))."""
    from fp_compile import dispatch
    from fp_compile.kernels import utils as ku

    sel = dispatch.select(q, k, scale, config, with_mass=True)
    keep, mass = dispatch.select_mask(q, k, scale, config.replace(kernel="reference"),
                                      return_mass=True)
    num, idx = ku.compact_mask(keep)
    assert torch.equal(sel.num, num) and torch.equal(sel.idx, idx)
    torch.testing.assert_close(sel.mass, mass, atol=1e-6, rtol=1e-6)
    return sel, keep
