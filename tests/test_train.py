"""The training script: the loss is on the answer tokens (plus the weighted next-token term), the
schedule follows the budget, and a tiny run writes weights that load and score."""

import math

import pytest
import torch
import torch.nn.functional as F

from fp_compile.demo import models as fm
from fp_compile.demo import tasks as ft
from fp_compile.demo import train
from fp_compile.demo import trained as tr

TINY = ["--device", "cpu", "--dim", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1",
        "--intermediate", "64", "--stages", "96x4,128x2", "--fracs", "1,1",
        "--eval-lengths", "128", "--eval-n", "3", "--eval-batch", "3"]


def _model():
    torch.manual_seed(0)
    return fm.Transformer(fm.ModelArgs(vocab_size=ft.VOCAB.size, dim=32, n_layers=1, n_heads=2,
                                       n_kv_heads=1, intermediate_size=64, max_seq_len=256))


def test_answer_loss_is_the_cross_entropy_of_the_answer_tokens():
    model = _model()
    batch = ft.mixed_batch(10, 200, seed=0)
    with torch.no_grad():
        total, loss, ok, right = train.answer_loss(model, batch.tokens, batch.answer_mask)
        logits = model(batch.tokens)[:, :-1]
    m = batch.answer_mask[:, 1:]
    expected = F.cross_entropy(logits[m], batch.tokens[:, 1:][m])
    assert torch.equal(right, ((logits.argmax(-1) == batch.tokens[:, 1:]) & m).sum(-1))
    assert torch.allclose(loss, expected, atol=1e-5) and torch.equal(total, loss)
    rest = ~m
    lm = F.cross_entropy(logits[rest], batch.tokens[:, 1:][rest])
    with torch.no_grad():
        total, *_ = train.answer_loss(model, batch.tokens, batch.answer_mask, 0.5)
    assert torch.allclose(total, expected + 0.5 * lm, atol=1e-5)


def test_row_correct_counts_every_answer_of_the_row():
    model = _model()
    batch = ft.generate("niah_multikey", 4, 160, seed=1, n_keys=4, n_queries=3)
    with torch.no_grad():
        _, _, ok, _ = train.answer_loss(model, batch.tokens, batch.answer_mask)
        pred = model(batch.tokens)[:, :-1].argmax(-1)
    m = batch.answer_mask[:, 1:]
    assert torch.equal(ok, ((pred == batch.tokens[:, 1:]) | ~m).all(-1))


def test_schedule_warms_up_decays_and_walks_the_curriculum():
    args = train.resolve(train.build_parser().parse_args(["--out", "x"] + TINY))
    assert args.lm_weight == train.PRESETS["h200"]["lm_weight"]
    assert train.lr_at(args, 0, 0.0) == pytest.approx(args.lr / args.warmup)
    assert train.lr_at(args, 10 ** 6, 0.0) == pytest.approx(args.lr)
    assert train.lr_at(args, 10 ** 6, 1.0) == pytest.approx(args.lr / 10)
    assert [train.stage_at(args, p) for p in (0.0, 0.49, 0.51, 1.0)] == \
        [(96, 4), (96, 4), (128, 2), (128, 2)]


def test_a_tiny_run_writes_weights_that_load_and_score(tmp_path, capsys):
    meta = train.main(TINY + ["--steps", "4", "--out", str(tmp_path)])
    path = tmp_path / tr.WEIGHTS.name
    assert meta["summary"]["steps"] == 4 and len(meta["log"]) >= 1
    assert set(meta["dense_accuracy"]) == {"128"}
    assert set(meta["dense_accuracy"]["128"]) == set(ft.TASKS)
    assert meta["versions"]["torch"] == torch.__version__
    assert math.isfinite(meta["log"][-1]["loss"]) and 0 <= meta["log"][-1]["token_acc"] <= 1
    model, loaded = tr.load_trained_model("cpu", path=path, max_seq_len=300)
    assert model.args.max_seq_len == 300 and model.args.rope_theta == train.ROPE_THETA
    assert loaded["model_args"]["max_seq_len"] == train.MAX_SEQ_LEN
    acc = tr.evaluate(tr.tail_forward(model), "niah_single", 128, 3)
    assert acc == meta["dense_accuracy"]["128"]["niah_single"]
    assert "wrote" in capsys.readouterr().out


def test_missing_weights_name_the_path_and_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="longctx.safetensors.*fp_compile.demo.train"):
        tr.load_trained_model(path=tmp_path / "longctx.safetensors")


@pytest.mark.parametrize("seq_len", [128, 512, 2048])
def test_training_answers_fit_in_the_loss_tail(seq_len):
    for seed in range(5):
        batch = ft.mixed_batch(10, seq_len, seed=seed)
        assert not batch.answer_mask[:, :-train.LOSS_TAIL].any()


def test_copy_batch_repeats_a_phrase_and_masks_what_a_copy_predicts():
    tokens, mask = ft.copy_batch(3, 100, seed=4)
    assert tokens.shape == mask.shape == (3, 100)
    P = int((~mask[0]).sum())
    assert ft.COPY_PERIOD[0] <= P <= ft.COPY_PERIOD[1]
    assert torch.equal(tokens[:, P:], tokens[:, :100 - P])
    assert int(tokens.min()) >= ft.VOCAB.noise[0] and int(tokens.max()) < ft.VOCAB.size
    assert torch.equal(tokens, ft.copy_batch(3, 100, seed=4)[0])
    model = _model()
    with torch.no_grad():
        loss = train.copy_loss(model, tokens, mask)
        logits = model(tokens)[:, :-1]
    m = mask[:, 1:]
    assert torch.allclose(loss, F.cross_entropy(logits[m], tokens[:, 1:][m]), atol=1e-5)
