"""``python -m fp_compile``: explain, demo (tiny sizes) and bench's entry, in subprocesses."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "fp_compile", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_help_lists_commands():
    out = run_cli("--help")
    for command in ("demo", "bench", "explain"):
        assert command in out


def test_explain_prefill_and_decode():
    prefill = run_cli("explain", "--seq-len", "64", "--dense-layers", "1")
    decode = run_cli("explain", "--seq-len", "64", "--decode")
    print(prefill, decode)
    assert "rewritten 1, left dense 1" in prefill     # layer 1 kept dense by --dense-layers
    assert "rewritten 0, left dense 2" in decode      # q_len 1 against a masked KV cache


def test_demo_tiny_builtin_model(tmp_path):
    png = tmp_path / "mask.png"
    out = run_cli("demo", "--model", "builtin", "--seq-len", "512", "--layers", "2",
                  "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--intermediate", "128",
                  "--vocab", "128", "--block-size", "32", "--reps", "1", "--dense", "eager",
                  "--no-progress", "--plot", str(png))
    print(out)
    assert "rewritten: 2 SDPA call(s); left dense: 0" in out
    assert "layer 0:" in out and "layer 1:" in out
    assert "error vs dense" in out and "prefill time" in out
    assert png.stat().st_size > 1000


def test_demo_hf_model_with_dense_layer():
    pytest.importorskip("transformers")
    out = run_cli("demo", "--model", "hf", "--seq-len", "256", "--layers", "2", "--hidden", "64",
                  "--heads", "4", "--kv-heads", "2", "--intermediate", "128", "--vocab", "128",
                  "--block-size", "16", "--reps", "1", "--dense", "eager", "--dense-layers", "0")
    print(out)
    assert "Hugging Face LlamaForCausalLM" in out
    assert "rewritten: 1 SDPA call(s); left dense: 1" in out
    assert "layer 1:" in out and "layer 0:" not in out


def test_bench_entry_reaches_the_benchmark():
    out = run_cli("bench", "--help")
    assert "usage: python -m fp_compile bench" in out and "--seq-lens" in out
