"""``python -m fp_compile demo`` on tiny models, end to end (in-process through
``fp_compile.cli.main``): compile, run, per-layer density, error and timing, the plot."""

import pytest

from fp_compile.cli import main

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("fresh_dynamo")]


def test_demo_tiny_builtin_model(tmp_path, capsys):
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


def test_demo_hf_model_with_dense_layer(capsys):
    pytest.importorskip("transformers")
    main(["demo", "--model", "hf", "--seq-len", "256", "--layers", "2", "--hidden", "64",
          "--heads", "4", "--kv-heads", "2", "--intermediate", "128", "--vocab", "128",
          "--block-size", "16", "--reps", "1", "--dense", "eager", "--dense-layers", "0",
          "--no-progress"])
    out = capsys.readouterr().out
    assert "Hugging Face LlamaForCausalLM" in out
    assert "rewritten: 1 SDPA call(s); left dense: 1" in out
    assert "layer 1:" in out and "layer 0:" not in out
