"""The installed package's entry points, each in a fresh interpreter (a subprocess): the
``flashprefill`` backend found by name through ``torch_dynamo_backends`` without importing
fp_compile first, ``python -m fp_compile``, and the tensor-parallel benchmark under torchrun
(``-m fp_compile.demo.tp``)."""

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


def _entry_point_installed() -> bool:
    return any(e.name == "flashprefill"
               for e in importlib.metadata.entry_points(group="torch_dynamo_backends"))


@pytest.mark.skipif(not _entry_point_installed(),
                    reason="fp_compile not pip-installed (no torch_dynamo_backends entry point)")
def test_backend_by_name_through_the_entry_point(tmp_path):
    script = textwrap.dedent("""
        import sys
        import torch
        import torch.nn.functional as F
        from torch._dynamo.utils import counters

        def attn(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, 4, 50, 16, generator=g)
        k, v = torch.randn(2, 1, 2, 50, 16, generator=g)
        assert "fp_compile" not in sys.modules
        compiled = torch.compile(attn, backend="flashprefill", fullgraph=True,
                                 options={"alpha": 0.0, "block_size": 16, "min_seq_len": 0})
        err = (compiled(q, k, v) - attn(q, k, v)).abs().max().item()
        assert "fp_compile" in sys.modules, "the entry point should have imported fp_compile"
        assert counters["flashprefill"]["sdpa_rewritten"] == 1, dict(counters["flashprefill"])
        assert err < 1e-5, err
        print("OK", err)
    """)
    env = dict(os.environ)
    # an editable install finds the source tree by itself; this covers a plain checkout too
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr[-4000:]


def test_entry_point_reaches_the_benchmark():
    """``python -m fp_compile`` and bench as an imported module (it used to be loaded from
    ../benchmarks by file path, absent from an installed package)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "fp_compile", "bench", "--help"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "usage: python -m fp_compile bench" in proc.stdout and "--seq-lens" in proc.stdout


def test_tensor_parallel_benchmark_under_torchrun_hf_model(tmp_path):
    """``torchrun -m fp_compile.demo.tp`` on two CPU processes (gloo) with a Hugging Face Llama
    sharded by its own tp plan: every variant's SDPA calls rewritten with the rank's own heads,
    and at alpha 0 sparse TP equals dense TP and the unsharded model on one process."""
    pytest.importorskip("transformers")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "tp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "fp_compile.demo.tp", "--device", "cpu", "--hf", "--layers", "1",
           "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--intermediate", "128",
           "--vocab", "128", "--seq-len", "256", "--block-size", "16", "--min-seq-len", "64",
           "--alpha", "0", "--reps", "1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "| 256 |" in proc.stdout
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["rel_vs_dense"] < 1e-5 and row["rel_vs_single"] < 1e-5, row
    rank0, rank1 = result["reports"]
    for variant, heads in (("sparse_tp", 2), ("single", 4)):
        summary, shapes = rank0[variant]
        assert summary.startswith("flashprefill: 1 SDPA call(s) rewritten, 0 left dense")
        assert [s[1] for s in shapes] == [heads], shapes
    assert rank1["sparse_tp"] == rank0["sparse_tp"] and "single" not in rank1
