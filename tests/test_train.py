"""The training script: the loss is on the answer tokens (plus the weighted next-token term; set
answers in any order), the schedule follows the budget, and a tiny run writes weights that load
and score; the score takes set answers in any order too."""

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


class _Logits(torch.nn.Module):
    """A stand-in model whose hidden states are the given logits (lm_head: identity)."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.lm_head = logits, torch.nn.Identity()

    def hidden(self, tokens):
        return self.logits


def test_set_loss_is_minus_log_of_the_members_not_yet_fed():
    torch.manual_seed(0)
    S, answer = 80, [300, 310, 320]
    tokens = torch.randint(16, 256, (2, S))
    tokens[:, -3:] = torch.tensor(answer)
    mask = torch.zeros(2, S, dtype=torch.bool)
    mask[:, -3:] = True
    logits = torch.randn(2, S, ft.VOCAB.size)
    sets = torch.tensor([True, False])
    _, loss, _, _ = train.answer_loss(_Logits(logits), tokens, mask, sets=sets)
    p = logits[:, -4:-1].softmax(-1)                    # the positions predicting the answer
    set_nll = [-p[0, t, answer[t:]].sum().log() for t in range(3)]
    ce_nll = [-p[1, t, answer[t]].log() for t in range(3)]
    assert torch.allclose(loss, torch.stack(set_nll + ce_nll).mean(), atol=1e-5)


def test_set_loss_of_a_one_member_answer_is_the_cross_entropy():
    model = _model()
    batch = ft.generate("niah_multivalue", 4, 160, seed=2, n_values=1, n_distract=2)
    sets = ft.is_set(batch.task_ids)
    assert sets.all()
    with torch.no_grad():
        as_set = train.answer_loss(model, batch.tokens, batch.answer_mask, sets=sets)
        plain = train.answer_loss(model, batch.tokens, batch.answer_mask)
    assert torch.allclose(as_set[1], plain[1], atol=1e-6)
    assert torch.equal(as_set[2], plain[2]) and torch.equal(as_set[3], plain[3])


def _scored(task, answer_argmax, **params):
    """``correct`` of logits whose argmax at the answer positions is ``answer_argmax``."""
    batch = ft.generate(task, 1, 200, seed=3, **params)
    T = tr.TAIL
    logits = torch.zeros(1, T, ft.VOCAB.size)
    logits[0, torch.arange(T - 1), batch.tokens[0, -T + 1:]] = 1.0      # right elsewhere
    n = len(answer_argmax)
    logits[0, T - 1 - n + torch.arange(n)] = 0.0
    logits[0, T - 1 - n + torch.arange(n), torch.tensor(answer_argmax)] = 1.0
    return batch.answer(0), lambda sets=None: bool(tr.correct(logits, batch, sets)[0])


def test_correct_takes_a_set_answer_in_any_order_but_no_repeat_or_outsider():
    answer, _ = _scored("niah_multivalue", [0, 0, 0], n_values=3)
    a, b, c = answer                                     # fed in this order
    for argmax, right in [([a, b, c], True), ([b, c, c], True), ([c, b, c], True),
                          ([a, a, c], False),            # a repeat: a was fed already
                          ([b, a, c], False), ([a, b, b], False),
                          ([a, 511 if 511 not in answer else 510, c], False)]:   # an outsider
        assert _scored("niah_multivalue", argmax, n_values=3)[1]() == right, argmax
    # exact match in order when no row is a set; single answers stay exact
    assert not _scored("niah_multivalue", [b, c, c], n_values=3)[1](torch.tensor([False]))
    answer, _ = _scored("niah_single", [0, 0])
    assert _scored("niah_single", answer)[1]()
    assert not _scored("niah_single", answer[::-1])[1]() or answer[0] == answer[1]


def test_generated_set_answers_match_as_sets():
    assert tr.answer_matches("common_words", [30, 10, 20], [10, 20, 30])
    assert not tr.answer_matches("common_words", [10, 10, 30], [10, 20, 30])
    assert not tr.answer_matches("niah_multivalue", [10, 20, 40], [10, 20, 30])
    assert tr.answer_matches("niah_single", [7, 5], [7, 5])
    assert not tr.answer_matches("niah_single", [5, 7], [7, 5])


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


def test_init_continues_from_saved_weights_and_records_them(tmp_path):
    first = train.main(TINY + ["--steps", "2", "--out", str(tmp_path / "a")])
    init = tmp_path / "a" / tr.WEIGHTS.name
    # lr 0: the step changes nothing (AdamW's decay is lr-scaled), so the new weights must be
    # exactly the ones --init loaded
    meta = train.main(TINY + ["--steps", "1", "--lr", "0", "--init", str(init),
                              "--out", str(tmp_path / "b")])
    before, _ = tr.load_trained_model("cpu", path=init)
    after, _ = tr.load_trained_model("cpu", path=tmp_path / "b" / tr.WEIGHTS.name)
    for (name, a), b in zip(before.state_dict().items(), after.state_dict().values()):
        assert torch.equal(a, b), name
    assert meta["init"]["path"] == str(init)
    assert meta["init"]["summary"] == first["summary"]
    assert meta["init"]["dense_accuracy"] == first["dense_accuracy"]


def test_bad_training_options_name_the_option(tmp_path):
    train.main(TINY + ["--steps", "1", "--out", str(tmp_path / "a")])
    wider = [x if x != "32" else "48" for x in TINY]
    with pytest.raises(SystemExit, match="--init"):
        train.main(wider + ["--steps", "1", "--init", str(tmp_path / "a" / tr.WEIGHTS.name),
                            "--out", str(tmp_path / "b")])
    with pytest.raises(SystemExit, match="--init .*missing.safetensors: no such file"):
        train.main(TINY + ["--steps", "1", "--init", str(tmp_path / "missing.safetensors"),
                           "--out", str(tmp_path / "c")])
    with pytest.raises(SystemExit, match="--tasks.*niah_sngle"):
        train.resolve(train.build_parser().parse_args(["--out", "x", "--tasks", "niah_sngle"]))
    with pytest.raises(SystemExit, match="--init"):
        train.resolve(train.build_parser().parse_args(["--out", "x", "--preset",
                                                       "h200-finetune"]))
    (tmp_path / "w.safetensors").write_bytes(b"")
    args = train.resolve(train.build_parser().parse_args(
        ["--out", "x", "--preset", "h200-finetune", "--init", str(tmp_path / "w.safetensors")]))
    assert args.tasks.count("niah_multivalue") == 3 and len(args.tasks) == 7
    assert train.resolve(train.build_parser().parse_args(["--out", "x"])).tasks == ft.TASKS


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
