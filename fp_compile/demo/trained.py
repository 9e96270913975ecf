"""The long-context model shipped with the project: loading, scoring, and compiled forwards.

``weights/longctx.safetensors`` (+ ``longctx.json``: ModelArgs, vocabulary layout, training log,
dense accuracy table, versions) is a small gpt-fast-style decoder (``models.Transformer``)
trained from scratch by ``python -m fp_compile.demo.train`` on the tasks of ``tasks``.

    model, meta = load_trained_model("cuda", torch.bfloat16)
    forward = tail_forward(model)                        # dense (eager SDPA)
    fast, reports = compiled_forward(model, FlashPrefillConfig(min_seq_len=0))
    evaluate(fast, "niah_multikey", 16384, n=32)         # accuracy (exact / set match), 0..1
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Callable

import torch

from ..config import FlashPrefillConfig
from . import models as fm
from . import tasks as ft

WEIGHTS_DIR = pathlib.Path(__file__).resolve().parent / "weights"
WEIGHTS = WEIGHTS_DIR / "longctx.safetensors"
TAIL = 16                   # logits kept per prompt: the answer (<= 15 tokens) sits at the end
EVAL_SEED = 10 ** 9         # evaluation seeds start here; training draws its own
TRAIN_COMMAND = "python -m fp_compile.demo.train --device cuda --out DIR"


def meta_path(weights: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(weights).with_suffix(".json")


def save_trained(model: fm.Transformer, meta: dict, path) -> pathlib.Path:
    """Write the weights (fp32 when they fit in 24 MB, else bf16: the budget is 25 MB) and
    ``meta`` + the ModelArgs as JSON next to them. Returns the weights' path."""
    from safetensors.torch import save_file

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = sum(p.numel() for p in model.parameters())
    dtype = torch.float32 if 4 * n <= 24 * 10 ** 6 else torch.bfloat16
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    meta = dict(meta, model_args=dataclasses.asdict(model.args), vocab=ft.VOCAB.as_dict(),
                tasks=list(ft.TASKS), weights_dtype=str(dtype).removeprefix("torch."),
                weights_bytes=path.stat().st_size, parameters=n)
    meta_path(path).write_text(json.dumps(meta, indent=1))
    return path


def load_trained_model(device="cpu", dtype: torch.dtype = torch.float32, path=None,
                       max_seq_len: int | None = None) -> tuple[fm.Transformer, dict]:
    """(model in eval mode on ``device`` in ``dtype``, its JSON metadata) from ``path`` (default:
    the shipped ``weights/longctx.safetensors``). ``max_seq_len`` overrides the saved one (the
    length of the RoPE tables and of the default KV cache)."""
    path = pathlib.Path(path or WEIGHTS)
    if not path.is_file() or not meta_path(path).is_file():
        raise FileNotFoundError(
            f"trained weights not found: {path} and {meta_path(path).name} beside it. Train them "
            f"with `{TRAIN_COMMAND}` and copy DIR/longctx.safetensors and DIR/longctx.json there.")
    meta = json.loads(meta_path(path).read_text())
    if meta.get("vocab") != json.loads(json.dumps(ft.VOCAB.as_dict())):
        raise ValueError(f"{path}: trained with another vocabulary layout than tasks.VOCAB")
    args = dict(meta["model_args"])
    if max_seq_len:
        args["max_seq_len"] = max_seq_len
    with torch.device(device):
        model = fm.Transformer(fm.ModelArgs(**args))
    load_weights(model, path)
    return model.to(dtype=dtype).eval(), meta


def load_weights(model: fm.Transformer, path, device="cpu") -> None:
    """Load saved weights (a ``longctx.safetensors``) into ``model``, as fp32, read onto
    ``device``; a model of another shape raises RuntimeError (``load_state_dict``'s)."""
    from safetensors.torch import load_file

    state = load_file(str(path), device=str(device))
    model.load_state_dict({k: v.float() for k, v in state.items()})


def tail_forward(model: fm.Transformer, tail: int = TAIL) -> Callable:
    """``forward(ids (B, S)) -> logits (B, tail, vocab)`` of the last ``tail`` positions: all
    that scoring needs, without the (B, S, vocab) logits of a long prompt."""

    def forward(ids: torch.Tensor) -> torch.Tensor:
        return model.lm_head(model.hidden(ids)[:, -tail:])

    return forward


def compiled_forward(model: fm.Transformer, config: FlashPrefillConfig, *,
                     inductor: bool = True, dynamic: bool | None = None, tail: int = TAIL):
    """``(forward, reports)``: ``tail_forward`` compiled with the flashprefill pass under
    ``config``; ``reports`` receives each compiled graph's RewriteReport.

    ``inductor=True`` is the backend as users run it (``make_backend(config)``: the rewrite, then
    Inductor); ``False`` runs the rewritten graph as traced (the same op, no Inductor: quicker
    to compile, for CPU checks). Call ``torch._dynamo.reset()`` between configs.
    """
    backend, reports = pass_backend(config, inductor)
    return torch.compile(tail_forward(model, tail), backend=backend, dynamic=dynamic), reports


def pass_backend(config: FlashPrefillConfig, inductor: bool = True):
    """``(backend, reports)``: a torch.compile backend running the flashprefill pass under
    ``config``, and the list its graphs' RewriteReports go to. ``inductor=True``:
    ``make_backend(config)`` (the rewrite, then Inductor); ``False``: the rewritten graph runs
    as traced (no Inductor)."""
    from ..backend import make_backend
    from ..passes.sdpa_rewrite import rewrite_sdpa

    if inductor:
        backend = make_backend(config)
        return backend, backend.reports
    reports = []

    def backend(gm, example_inputs):
        reports.append(rewrite_sdpa(gm, config))
        return gm.forward
    return backend, reports


def effective_density(rows) -> float:
    """Mean over ``fp_compile.stats()`` rows and heads of the kept density, a head whose kv group
    ran dense (the dense fallback) counted as 1: the share of causal blocks attention computed.
    1.0 when nothing was recorded."""
    per = []
    for r in rows:
        dense = r.dense_heads or (False,) * len(r.head_density)
        per += [1.0 if dh else d for d, dh in zip(r.head_density, dense)]
    return sum(per) / len(per) if per else 1.0


def correct(logits: torch.Tensor, batch: ft.TaskBatch,
            sets: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) bool: at every answer position of the row the argmax of the logits before it is a
    right token: the answer token itself, or for a set answer (``tasks.SET_TASKS``) any member
    not yet fed (the teacher-forced set match: members in another order are right, a member
    already fed or an outsider is not). ``logits`` (B, T, vocab) are the last T positions'
    (T >= the answer length + 1); ``sets`` (B,) bool overrides which rows are sets (all False:
    exact match in order)."""
    S, T = batch.tokens.shape[1], logits.shape[1]
    if batch.answer_mask[:, :S - T + 1].any():
        raise ValueError(f"an answer is longer than the {T - 1} tokens the logits cover")
    pred = logits[:, :-1].argmax(-1)
    target, mask = batch.tokens[:, S - T + 1:], batch.answer_mask[:, S - T + 1:]
    sets = ft.is_set(batch.task_ids) if sets is None else sets
    return (ft.answer_hits(pred, target, mask, sets) | ~mask).all(-1)


def answer_matches(task: str, answer: list[int], expected: list[int]) -> bool:
    """A generated ``answer`` is right: equal to ``expected``, as a set (the same members, none
    repeated) when ``task`` is one of ``tasks.SET_TASKS``."""
    if task in ft.SET_TASKS:
        return sorted(answer) == sorted(expected)
    return answer == expected


@torch.no_grad()
def evaluate(forward: Callable, task: str, seq_len: int, n: int, seed: int = 0, *,
             batch_size: int = 8, device="cpu", haystack: str = "noise",
             params: dict | None = None) -> float:
    """Accuracy of ``forward`` (ids -> logits of the last positions, e.g. ``tail_forward(model)``
    or a compiled one) on ``n`` prompts of ``task`` of ``seq_len`` tokens (``tasks.EVAL_PARAMS``
    unless ``params``), teacher-forced in one prefill each, scored by ``correct`` (exact match;
    a set match for set answers). The prompts depend on (task, seq_len, seed, i) only, so
    every forward sees the same ones."""
    hits = 0
    for batch in eval_batches(task, seq_len, n, seed, batch_size, device, haystack, params):
        hits += int(correct(forward(batch.tokens), batch).sum())
    return hits / n


def eval_batches(task: str, seq_len: int, n: int, seed: int = 0, batch_size: int = 8,
                 device="cpu", haystack: str = "noise", params: dict | None = None):
    """The ``n`` prompts ``evaluate`` and ``greedy_accuracy`` score, in batches of
    ``batch_size``: batch i is drawn from its own seed (task, seq_len, seed, i), so the same
    arguments give the same prompts."""
    params = ft.EVAL_PARAMS[task] if params is None else params
    for i, start in enumerate(range(0, n, batch_size)):
        yield ft.generate(task, min(batch_size, n - start), seq_len, device=device,
                          seed=EVAL_SEED + 7919 * seed + 104729 * seq_len + i,
                          haystack=haystack, **params)


def swap_caches(model: fm.Transformer, caches: list) -> list:
    """Give the model's layers these KV caches (None: none, as batched scoring needs); returns
    the ones they had."""
    old = [layer.attention.kv_cache for layer in model.layers]
    for layer, cache in zip(model.layers, caches):
        layer.attention.kv_cache = cache
    return old


@torch.no_grad()
def greedy_accuracy(model: fm.Transformer, task: str, seq_len: int, n: int, seed: int = 0, *,
                    batch_size: int = 8, device="cpu", haystack: str = "noise",
                    params: dict | None = None) -> float:
    """Accuracy of ``model``'s own greedy answers on ``evaluate``'s prompts: one prefill of the
    prompt, then one decode step per further answer token through the KV cache (set up here
    for one row of ``seq_len``), scored by ``answer_matches``. Unlike ``evaluate``, each answer
    token follows the model's own earlier ones, so a set answer can go wrong by repeating a
    member: what the demo prints. The caller's KV caches are restored afterwards."""
    saved = swap_caches(model, [None] * len(model.layers))
    model.setup_caches(1, seq_len)
    hits = 0
    try:
        for batch in eval_batches(task, seq_len, n, seed, batch_size, device, haystack, params):
            for row in range(len(batch)):
                expected = batch.answer(row)
                prompt = torch.tensor([batch.prompt(row)], device=device)
                hits += answer_matches(task, _answer(model, prompt, len(expected)), expected)
    finally:    # the caller's caches (none, for batched scoring) as they were
        swap_caches(model, saved)
    return hits / n


def sample_prompts(seq_len: int, per_task: int = 1, seed: int = 0, device="cpu"):
    """Calibration inputs: ``per_task`` prompts (B=1) of every task, as ``(ids,)`` tuples."""
    out = []
    for task in ft.TASKS:
        batch = ft.generate(task, per_task, seq_len, seed=EVAL_SEED - 1 - seed, device=device,
                            **ft.EVAL_PARAMS[task])
        out += [(batch.tokens[i:i + 1],) for i in range(per_task)]
    return out


# --------------------------------------------------------------------------------------------
# The demo: ``python -m fp_compile demo --model trained``.

DEMO_SEQ_LEN = {"cpu": 4096, "cuda": 32768}
DEMO_NEW_TOKENS = 8         # decode steps per question (the longest answer is 4 tokens)


def _answer(forward, prompt: torch.Tensor, n: int) -> list[int]:
    """Greedy answer of ``n`` tokens: one prefill of ``prompt`` (1, S), then decode steps
    against the caches set up by the caller (rewritten from position 0 by every prefill)."""
    S = prompt.shape[1]
    token = forward(prompt, torch.arange(S, device=prompt.device))[:, -1:].argmax(-1)
    out = [token]
    for i in range(n - 1):
        token = forward(token, torch.tensor([S + i], device=prompt.device))[:, -1:].argmax(-1)
        out.append(token)
    return torch.cat(out, 1)[0].tolist()


def run_demo(args, config: FlashPrefillConfig) -> dict:
    """One prompt of every task, answered by the dense model and by the model compiled with the
    pass (``make_backend(config)``; on CPU the rewritten graph runs as traced, without Inductor),
    printed side by side. ``args``: device, seq_len, seed."""
    from ..stats import reset_stats, stats

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    S = args.seq_len
    model, meta = load_trained_model(args.device, dtype, max_seq_len=S + DEMO_NEW_TOKENS)
    a = model.args
    print(f"model: {WEIGHTS.name}, trained by fp_compile.demo.train: {a.n_layers} layers, "
          f"hidden {a.dim}, {a.n_heads} heads / {a.n_kv_heads} kv heads, "
          f"{meta.get('parameters', 0) / 1e6:.1f}M parameters; {dtype}, device {args.device}")
    print(f"config: alpha={config.alpha} block_size={config.block_size} "
          f"min_seq_len={config.min_seq_len}; prompts of {S} tokens")
    torch._dynamo.reset()
    backend, reports = pass_backend(config.replace(collect_stats=True),
                                    inductor=args.device == "cuda")
    fast = torch.compile(model, backend=backend, dynamic=False)   # one prefill, one decode graph
    model.setup_caches(1, S + DEMO_NEW_TOKENS)
    results = {}
    with torch.no_grad():
        for task in ft.TASKS:
            n = ft.answer_len(task, **ft.EVAL_PARAMS[task])
            batch = ft.generate(task, 1, S + n, seed=EVAL_SEED + args.seed, device=args.device,
                                **ft.EVAL_PARAMS[task])
            prompt = batch.tokens[:, :S].clone(memory_format=torch.contiguous_format)
            expected = batch.answer(0)
            dense = _answer(model, prompt, n)
            reset_stats()
            sparse = _answer(fast, prompt, n)
            density = effective_density(stats().rows)
            right = {k: answer_matches(task, v, expected) for k, v in
                     (("dense", dense), ("flashprefill", sparse))}
            results[task] = dict(expected=expected, dense=dense, flashprefill=sparse,
                                 density=density, right=right)
            print(f"\n{task} (depth {float(batch.depth[0]):.2f}): {_describe(batch)}")
            print(f"  expected      {expected}" + ("  (a set: any order)" if task in ft.SET_TASKS
                                                   else ""))
            print(f"  dense         {dense}  {'right' if right['dense'] else 'WRONG'}")
            print(f"  flashprefill  {sparse}  {'right' if right['flashprefill'] else 'WRONG'}"
                  f"   (density {density:.3f})")
    from ..passes.report import RewriteReport

    report = RewriteReport.merge(reports)
    print(f"\nrewritten: {len(report.rewritten)} SDPA call(s) (prefill); left dense: "
          f"{len(report.skipped)} ({', '.join(sorted({s.reason for s in report.skipped}))})")
    return results


def _describe(batch: ft.TaskBatch) -> str:
    """The question of row 0 in words."""
    prompt = batch.prompt(0)
    asked = prompt[len(prompt) - prompt[::-1].index(ft.VOCAB.query) + 1:]
    return f"asked about token {asked}" if asked else "asked for the common words"
