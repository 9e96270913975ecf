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


def test_demo_trained_model_answers_with_and_without_the_pass(capsys):
    from fp_compile.demo import tasks as ft
    from fp_compile.demo.trained import load_trained_model

    layers = load_trained_model()[0].args.n_layers
    main(["demo", "--model", "trained", "--seq-len", "1024", "--block-size", "64",
          "--no-progress"])
    out = capsys.readouterr().out
    assert f"rewritten: {layers} SDPA call(s) (prefill); left dense: {layers}" in out
    for task in ft.TASKS:
        assert f"\n{task} (" in out
    assert out.count("  dense  ") == out.count("  flashprefill  ") == len(ft.TASKS)
