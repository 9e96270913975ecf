"""Each script in examples/ runs on CPU with small sizes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_example(name, *args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    print(proc.stdout)
    return proc.stdout


def test_plot_block_mask(tmp_path):
    pytest.importorskip("matplotlib")
    out = run_example("plot_block_mask.py", "--seq-len", "1024", "--block-size", "32",
                      "--out", str(tmp_path))
    assert len(list(tmp_path.glob("head*.png"))) == 4
    assert "density" in out


def test_handwritten_model():
    out = run_example("handwritten_model.py", "--seq-len", "200", "--hidden", "64",
                      "--block-size", "16", "--new-tokens", "4")
    assert "SDPA calls rewritten: 2" in out and ": same" in out


def test_compile_hf_model():
    pytest.importorskip("transformers")
    out = run_example("compile_hf_model.py", "--family", "mistral", "--seq-len", "160",
                      "--hidden", "64", "--block-size", "16", "--new-tokens", "3")
    assert "rewritten 2 (prefill)" in out


def test_export_aoti(tmp_path):
    out = run_example("export_aoti.py", "--seq-len", "128", "--hidden", "64",
                      "--block-size", "16", "--out", str(tmp_path / "m.pt2"))
    assert "2 flash_prefill op(s), 0 SDPA call(s) left" in out
    assert (tmp_path / "m.pt2").exists()
