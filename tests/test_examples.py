"""Each script in examples/ runs on CPU with small sizes, once, as a user runs it (a subprocess);
their defaults are checked in-process, without running them."""

import argparse
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fp_compile import FlashPrefillConfig

ROOT = Path(__file__).resolve().parent.parent


def run_example(name, *args, cwd=ROOT, timeout=600, **env_vars):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **env_vars)
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    print(proc.stdout)
    return proc.stdout


class _Parsed(Exception):
    pass


def parsed_args(name, argv=()):
    """The Namespace examples/<name>'s main(argv) parses; main stops right after parsing."""
    spec = importlib.util.spec_from_file_location(f"example_{Path(name).stem}",
                                                  ROOT / "examples" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parse = argparse.ArgumentParser.parse_args

    def stop(self, args=None, namespace=None):
        raise _Parsed(parse(self, args, namespace))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", stop)
        with pytest.raises(_Parsed) as exc:
            module.main(list(argv))
    return exc.value.args[0]


# Bug 9: three examples defaulted to --alpha 0.0, so they only ever showed the dense case.
@pytest.mark.parametrize("name", ["compile_hf_model.py", "export_aoti.py",
                                  "handwritten_model.py", "plot_block_mask.py"])
def test_examples_default_to_the_configs_alpha(name):
    assert parsed_args(name).alpha == FlashPrefillConfig().alpha


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
    # --alpha 0 keeps every causal block: the example itself checks the tokens equal eager's.
    out = run_example("handwritten_model.py", "--seq-len", "200", "--hidden", "64",
                      "--block-size", "16", "--new-tokens", "4", "--alpha", "0")
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


def test_demo_extra_installs_triton():
    """Bug 9: importing fp_compile without triton prints torch's "Triton not available" warning
    (torch.library.triton_op looks for kernels when ops.py registers the op); the demo extra
    installs triton where it exists, as the test extra does."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.replace(" ", "").startswith("triton>=3.6;platform_system=='Linux'")
               for dep in extras["demo"]), extras["demo"]
