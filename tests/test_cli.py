"""``python -m fp_compile``: the commands run in-process through ``fp_compile.cli.main``; one
subprocess test checks the entry point itself (``__main__`` and the installed bench module)."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fp_compile.cli import main

ROOT = Path(__file__).resolve().parent.parent


def exit_code(argv):
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    return exc.value.code


@pytest.fixture
def restore_logging():
    """-v configures the root logger and the "fp_compile" logger: undo it after the test."""
    root, fp = logging.getLogger(), logging.getLogger("fp_compile")
    handlers, level = list(root.handlers), fp.level
    yield fp
    root.handlers[:] = handlers
    fp.setLevel(level)


# Bug 7: bad values ended in tracebacks (ValueError from the config, RuntimeError from the model
# for a one-token "prefill"); now they are usage errors naming the option.
@pytest.mark.parametrize("argv, option", [
    (["demo", "--block-size", "100"], "--block-size"),     # not a power of two
    (["demo", "--alpha", "2"], "--alpha"),
    (["demo", "--seq-len", "0"], "--seq-len"),
    (["demo", "--heads", "3"], "--heads"),                 # not a multiple of the 2 kv heads
    (["explain", "--alpha", "2"], "--alpha"),
    (["explain", "--seq-len", "1"], "--seq-len"),          # one token is a decode step
    (["explain", "--dense-layers", "-1"], "--dense-layers"),
])
def test_bad_values_are_usage_errors_naming_the_option(capsys, argv, option):
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert option in err and "usage:" in err and "Traceback" not in err


def test_unknown_command_says_so(capsys):
    assert exit_code(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'frobnicate'" in err


@pytest.mark.parametrize("argv", [["-v", "explain", "--seq-len", "32", "--layers", "1"],
                                  ["explain", "-v", "--seq-len", "32", "--layers", "1"],
                                  ["explain", "--seq-len", "32", "--layers", "1", "--verbose"]])
def test_verbose_before_or_after_the_command(argv, capsys, restore_logging, fresh_dynamo):
    main(argv)
    assert restore_logging.level == logging.DEBUG
    assert "rewritten 1, left dense 0" in capsys.readouterr().out


@pytest.mark.parametrize("argv, default", [(["--help"], None),
                                           (["demo", "--help"], "(default: 0.12)"),
                                           (["explain", "--help"], "(default: 256)")])
def test_help_shows_defaults_and_no_rst_markup(capsys, argv, default):
    assert exit_code(argv) == 0
    out = capsys.readouterr().out
    assert "``" not in out
    if default:
        assert default in out
    else:
        assert all(command in out for command in ("demo", "explain", "bench"))


def test_explain_prefill_and_decode(capsys, fresh_dynamo):
    main(["explain", "--seq-len", "64", "--dense-layers", "1"])
    prefill = capsys.readouterr().out
    torch._dynamo.reset()
    main(["explain", "--seq-len", "64", "--decode"])
    decode = capsys.readouterr().out
    assert "rewritten 1, left dense 1" in prefill     # layer 1 kept dense by --dense-layers
    assert "rewritten 0, left dense 2" in decode      # q_len 1 against a masked KV cache


def test_demo_tiny_builtin_model(tmp_path, capsys, fresh_dynamo):
    pytest.importorskip("matplotlib")
    png = tmp_path / "mask.png"
    main(["demo", "--model", "builtin", "--seq-len", "512", "--layers", "2", "--hidden", "64",
          "--heads", "4", "--kv-heads", "2", "--intermediate", "128", "--vocab", "128",
          "--block-size", "32", "--reps", "1", "--dense", "eager", "--no-progress",
          "--plot", str(png)])
    out = capsys.readouterr().out
    assert "rewritten: 2 SDPA call(s); left dense: 0" in out
    assert "layer 0:" in out and "layer 1:" in out
    assert "error vs dense" in out and "prefill time" in out
    assert png.stat().st_size > 1000


def test_demo_hf_model_with_dense_layer(capsys, fresh_dynamo):
    pytest.importorskip("transformers")
    main(["demo", "--model", "hf", "--seq-len", "256", "--layers", "2", "--hidden", "64",
          "--heads", "4", "--kv-heads", "2", "--intermediate", "128", "--vocab", "128",
          "--block-size", "16", "--reps", "1", "--dense", "eager", "--dense-layers", "0",
          "--no-progress"])
    out = capsys.readouterr().out
    assert "Hugging Face LlamaForCausalLM" in out
    assert "rewritten: 1 SDPA call(s); left dense: 1" in out
    assert "layer 1:" in out and "layer 0:" not in out


def test_entry_point_reaches_the_benchmark():
    """The one subprocess test: ``python -m fp_compile`` and bench as an imported module (it used
    to be loaded from ../benchmarks by file path, absent from an installed package)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "fp_compile", "bench", "--help"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "usage: python -m fp_compile bench" in proc.stdout and "--seq-lens" in proc.stdout
