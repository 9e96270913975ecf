"""Shared test setup.

Without a GPU the Triton kernels can only run in Triton's interpreter, which must be switched on
before triton is first imported: do it here, before any test module imports fp_compile.
"""

import os
import shutil
import subprocess


def _has_cuda() -> bool:
    # Decided without importing torch (importing torch may import triton).
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except Exception:
        return False


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches, fp_compile's counters and backend reports cleared before and after a
    test (modules that compile use it for every test:
    ``pytestmark = pytest.mark.usefixtures("fresh_dynamo")``)."""
    from torch._dynamo.utils import counters

    from fp_compile.backend import reset_reports

    torch._dynamo.reset()
    counters.clear()
    reset_reports()
    yield
    torch._dynamo.reset()
    counters.clear()
    reset_reports()


@pytest.fixture(autouse=True)
def fresh_dense_history():
    """Every test starts with no record of earlier dense decisions (``dense_history``), so the
    dispatch's speculative dense launch depends only on the test's own calls."""
    from fp_compile import dense_history

    dense_history.clear()
    yield
    dense_history.clear()
