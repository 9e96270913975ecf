"""Test helpers shared by the test modules."""

import torch


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
