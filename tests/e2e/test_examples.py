"""Each script in examples/ runs on CPU with small sizes, once, as a user runs it (a subprocess).

What the scripts compute is checked in-process elsewhere (tests/e2e/test_hf_models.py,
tests/test_models.py, tests/test_export.py); here only what a subprocess alone can show: the
script runs to the end, its own checks pass (each exits non-zero when --alpha 0 misses eager or
an op is missing), and it writes where it says. Their argument defaults are checked in-process in
tests/test_examples.py.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


def run_example(name, *args, cwd=ROOT, timeout=600, **env_vars):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **env_vars)
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    print(proc.stdout)
    return proc.stdout


def test_plot_block_mask(tmp_path):
    """Bug 9: without --out it wrote into the current directory; now a temp dir, printed."""
    pytest.importorskip("matplotlib")
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    out = run_example("plot_block_mask.py", "--seq-len", "1024", "--block-size", "32",
                      cwd=cwd, TMPDIR=str(tmp))
    assert list(cwd.iterdir()) == []
    where = Path(re.search(r"pictures in (.+)", out).group(1).strip())
    assert where.parent == tmp
    assert len(list(where.glob("head*.png"))) == 4
    assert "density" in out


def test_handwritten_model():
    # --alpha 0 keeps every causal block: the script exits non-zero unless its tokens equal
    # eager's (no in-process test generates with the compiled built-in model).
    out = run_example("handwritten_model.py", "--seq-len", "200", "--hidden", "64",
                      "--block-size", "16", "--new-tokens", "4", "--alpha", "0")
    assert ": same" in out


def test_compile_hf_model():
    # at the default alpha, as a user runs it; the rewrite count and alpha-0 tokens of a
    # compiled HF generate() are checked in-process (e2e/test_hf_models.py)
    pytest.importorskip("transformers")
    out = run_example("compile_hf_model.py", "--family", "mistral", "--seq-len", "160",
                      "--hidden", "64", "--block-size", "16", "--new-tokens", "3")
    assert re.search(r"new tokens \[\d+, \d+, \d+\], eager", out), out


def test_export_aoti(tmp_path):
    # the script itself exits non-zero unless every layer became a flash_prefill op; the
    # rewrite and the AOTInductor package's numbers are checked in-process (test_export.py)
    run_example("export_aoti.py", "--seq-len", "128", "--hidden", "64",
                "--block-size", "16", "--out", str(tmp_path / "m.pt2"))
    assert (tmp_path / "m.pt2").exists()
