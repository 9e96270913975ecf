"""``python -m fp_compile``: argument handling, usage errors, -v and explain, in-process through
``fp_compile.cli.main``. The demo's whole-model runs (tests/e2e/test_demo.py) and the entry point
as a subprocess (tests/e2e/test_entry_points.py) are end-to-end tests."""

import logging

import pytest
import torch

from fp_compile.cli import main

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


def test_demo_trained_without_weights_names_the_file(monkeypatch, tmp_path, capsys):
    import fp_compile.demo.trained as tr

    monkeypatch.setattr(tr, "WEIGHTS", tmp_path / "longctx.safetensors")
    assert exit_code(["demo", "--model", "trained", "--seq-len", "64"]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "longctx.safetensors") in err and "Traceback" not in err
