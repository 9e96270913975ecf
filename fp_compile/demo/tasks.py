"""Synthetic long-context tasks in the style of RULER's synthetic set, generated on the device.

Every sample is one token sequence of ``seq_len`` tokens, the prompt followed by the answer::

    BOS TASK <body: haystack with the needles / statements / word list> QUERY TASK <q> <answer>

The answer is what the model must produce after the question; training puts the loss on the answer
tokens only and the evaluation scores a sample correct when every answer token is right. The
answers of ``SET_TASKS`` are sets, written in a random order per row (the prefix fed when
teacher-forced) and right in any order: at each answer position every member not yet fed is a
right token (``answer_options``), in the loss and the score. Not in ascending order: then the
largest member is never fed before the last position, and a model that always emits it (seen
on CPU) is right at every position, yet repeats itself when it generates.
Multi-key needles and variable tracking can ask ``n_queries`` questions in a row (each
``QUERY TASK q answer``, about different keys / chains): training does, for more answer
tokens per sequence; the evaluation asks one.
Tasks (``TASKS``):

* ``niah_single``: one needle ``NEEDLE k v1 v2`` in the haystack; ``q = k``; answer ``v1 v2``.
* ``niah_multikey``: ``n_keys`` needles with distinct keys (the others are distractors); one
  key is asked for; answer its two value tokens.
* ``niah_multivalue``: ``n_values`` needles ``NEEDLE k v`` share one key, plus
  ``n_distract`` needles of other keys; ``q = k``; answer every value of ``k``, a set (scored
  in any order, as RULER does).
* ``variable_tracking``: ``n_chains`` chains of ``hops + 1`` statements ``VAR v x1``,
  ``VAR x1 x2``, ... (``VAR a b``: b takes a's value, RULER's ``b = a``; a chain's statements
  in order, chains interleaved); ``q = v`` of the first chain; answer its variables
  ``x1 .. x_{hops+1}`` in chain order (every variable that holds ``v``).
* ``common_words``: the body is a word list in which ``n_common`` words take ``common_frac`` of
  the positions each and the rest are drawn uniformly from the other words; no ``q``; answer
  the common words (a set, as for multi-value needles).

Words are single tokens and the answer follows the question directly, so each lookup is a copy
of what follows an earlier occurrence of the question's last token (what induction heads do):
the formats are chosen to be learnable by a small model in minutes.

Needles and statements are placed at positions uniform over the body (the body is cut into one
segment per item, items are dealt to segments at random and land anywhere inside theirs), so the
queried item's depth is uniform. The haystack is i.i.d. noise tokens or, for ``"repeat"``, a
random phrase of 8-64 tokens repeated (RULER's repeated-sentences haystack). Everything is
vectorised over the batch (no per-token Python loop) and drawn from generators seeded by
``seed``, so a batch is a function of (task, batch, seq_len, seed, device, parameters).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Vocab:
    """Token layout: markers, then three disjoint ranges ``[lo, hi)``. Noise tokens double as the
    common-words task's words; keys double as variable names."""

    size: int = 512
    bos: int = 0
    needle: int = 1
    query: int = 2
    var: int = 3
    task0: int = 8            # task marker of TASKS[i] is task0 + i
    noise: tuple[int, int] = (16, 256)
    keys: tuple[int, int] = (256, 384)
    values: tuple[int, int] = (384, 512)

    def as_dict(self) -> dict:
        return asdict(self)


VOCAB = Vocab()
TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "common_words")
SET_TASKS = ("niah_multivalue", "common_words")     # answers are sets of distinct tokens
HAYSTACKS = ("noise", "repeat")
PHRASE_LEN = (8, 64)        # the repeated haystack's phrase: 8 to 64 tokens, per row


@dataclass
class TaskBatch:
    """``tokens`` (B, S) int64, prompt then answer; ``answer_mask`` (B, S) bool, True on the
    answer tokens (the last tokens of each row, and earlier answers with ``n_queries`` > 1);
    ``task_ids`` (B,) int64 into ``TASKS``;
    ``depth`` (B,) float32, the queried item's start / S (NaN for common_words)."""

    tokens: torch.Tensor
    answer_mask: torch.Tensor
    task_ids: torch.Tensor
    depth: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def _last_answer_len(self, row: int) -> int:
        mask = self.answer_mask[row].flip(0)
        return int(mask.long().cumprod(0).sum())

    def answer(self, row: int) -> list[int]:
        """The last question's answer (the only one unless ``n_queries`` > 1)."""
        return self.tokens[row, self.tokens.shape[1] - self._last_answer_len(row):].tolist()

    def prompt(self, row: int) -> list[int]:
        """Everything before the last answer."""
        return self.tokens[row, :self.tokens.shape[1] - self._last_answer_len(row)].tolist()

    def to(self, device) -> "TaskBatch":
        return TaskBatch(*(t.to(device) for t in (self.tokens, self.answer_mask, self.task_ids,
                                                    self.depth)))

    @staticmethod
    def cat(batches: list["TaskBatch"]) -> "TaskBatch":
        return TaskBatch(*(torch.cat(parts) for parts in zip(
            *((b.tokens, b.answer_mask, b.task_ids, b.depth) for b in batches))))


def is_set(task_ids: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the rows of ``task_ids`` (into ``TASKS``) whose answer is a set."""
    ids = torch.tensor([TASKS.index(t) for t in SET_TASKS], device=task_ids.device)
    return torch.isin(task_ids, ids)


def answer_options(mask: torch.Tensor, sets: torch.Tensor) -> torch.Tensor:
    """(B, T, T) bool: ``[b, t, j]`` is True when the token at position ``j`` is a right output
    for position ``t`` (teacher-forced: position t predicts the token at t). That is ``j == t``
    (always, on and off the answers), and for the rows ``sets`` (B,) marks, every later position
    of the same answer: the members not yet fed (the answer as written is the fed prefix).
    ``mask`` (B, T) marks the answer tokens (``TaskBatch.answer_mask`` or a tail of it)."""
    B, T = mask.shape
    start = mask & ~torch.cat([mask.new_zeros(B, 1), mask[:, :-1]], dim=1)
    span = start.cumsum(1)                                  # answer number, on the answers
    at = torch.arange(T, device=mask.device)
    same = (span[:, :, None] == span[:, None, :]) & mask[:, :, None] & mask[:, None, :]
    later = (at[None, :] > at[:, None]) & sets[:, None, None]
    return (same & later) | torch.eye(T, dtype=torch.bool, device=mask.device)


def answer_hits(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                sets: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: ``pred`` (B, T), the argmax at each position, is a right output there
    (``answer_options``) for the ``target`` tokens (B, T); False off ``mask``."""
    options = answer_options(mask, sets)
    return (options & (pred[:, :, None] == target[:, None, :])).any(-1) & mask


class _Draw:
    """Random draws on ``device`` from one generator seeded by ``seed``."""

    def __init__(self, seed: int, device) -> None:
        self.device = torch.device(device)
        self.g = torch.Generator(device=self.device).manual_seed(seed)

    def ints(self, lo: int, hi: int, shape) -> torch.Tensor:
        return torch.randint(lo, hi, shape, generator=self.g, device=self.device)

    def uniform(self, shape) -> torch.Tensor:
        return torch.rand(shape, generator=self.g, device=self.device)

    def distinct(self, B: int, n: int, lo: int, hi: int) -> torch.Tensor:
        """(B, n): per row, n distinct ints from [lo, hi), in random order."""
        if n > hi - lo:
            raise ValueError(f"cannot draw {n} distinct tokens from a range of {hi - lo}")
        return self.uniform((B, hi - lo)).argsort(dim=-1)[:, :n] + lo

    def permutation(self, B: int, n: int) -> torch.Tensor:
        return self.uniform((B, n)).argsort(dim=-1)


def _haystack(draw: _Draw, B: int, L: int, kind: str) -> torch.Tensor:
    lo, hi = VOCAB.noise
    if kind == "noise":
        return draw.ints(lo, hi, (B, L))
    if kind != "repeat":
        raise ValueError(f"unknown haystack {kind!r}; choose from {HAYSTACKS}")
    phrase = draw.ints(lo, hi, (B, PHRASE_LEN[1]))
    period = draw.ints(PHRASE_LEN[0], PHRASE_LEN[1] + 1, (B, 1))
    phase = draw.ints(0, PHRASE_LEN[0], (B, 1))
    at = (torch.arange(L, device=draw.device)[None] + phase) % period
    return phrase.gather(1, at)


def _place(draw: _Draw, body: torch.Tensor, items: torch.Tensor,
           slots: torch.Tensor | None = None) -> torch.Tensor:
    """Write ``items`` (B, n, L) into ``body`` (B, Lb) in place, item i in segment ``slots[:, i]``
    of n equal segments (a random deal when None) at a uniform offset inside it. Returns the
    start positions (B, n)."""
    B, n, L = items.shape
    seg = body.shape[1] // n
    if seg < L:
        raise ValueError(f"{n} items of {L} tokens do not fit in a body of {body.shape[1]} "
                         "tokens: lower the item count or raise seq_len")
    if slots is None:
        slots = draw.permutation(B, n)
    start = slots * seg + draw.ints(0, seg - L + 1, (B, n))
    at = (start[..., None] + torch.arange(L, device=body.device)).flatten(1)
    body.scatter_(1, at, items.flatten(1))
    return start


def _frame(task: str, body: torch.Tensor, query: torch.Tensor, answer: torch.Tensor,
           depth: torch.Tensor) -> TaskBatch:
    """Join BOS TASK body, then per question j: QUERY TASK query[:, j] answer[:, j].
    ``query`` (B, nq, Lq), ``answer`` (B, nq, La); ``depth`` (B,) holds body positions."""
    B, nq, device = body.shape[0], query.shape[1], body.device
    t = VOCAB.task0 + TASKS.index(task)

    def col(token: int, *shape) -> torch.Tensor:
        return torch.full((B, *shape, 1), token, dtype=torch.long, device=device)

    asks = torch.cat([col(VOCAB.query, nq), col(t, nq), query, answer], dim=-1)
    tokens = torch.cat([col(VOCAB.bos), col(t), body, asks.flatten(1)], dim=1)
    mask = torch.zeros_like(asks, dtype=torch.bool)
    mask[..., asks.shape[-1] - answer.shape[-1]:] = True
    mask = torch.cat([torch.zeros_like(tokens[:, :2 + body.shape[1]], dtype=torch.bool),
                      mask.flatten(1)], dim=1)
    ids = torch.full((B,), TASKS.index(task), dtype=torch.long, device=device)
    return TaskBatch(tokens, mask, ids, ((depth + 2) / tokens.shape[1]).float())


def _body_len(seq_len: int, query_len: int, answer_len: int, n_queries: int = 1) -> int:
    return seq_len - 2 - n_queries * (2 + query_len + answer_len)


def niah(draw, B, S, haystack="noise", n_keys=1, task="niah_multikey", n_queries=1) -> TaskBatch:
    if not 1 <= n_queries <= n_keys:
        raise ValueError(f"n_queries must be in [1, n_keys = {n_keys}], got {n_queries}")
    body = _haystack(draw, B, _body_len(S, 1, 2, n_queries), haystack)
    keys = draw.distinct(B, n_keys, *VOCAB.keys)
    values = draw.ints(*VOCAB.values, (B, n_keys, 2))
    items = torch.cat([torch.full_like(values[..., :1], VOCAB.needle), keys[..., None], values],
                      dim=-1)
    start = _place(draw, body, items)
    asked = draw.permutation(B, n_keys)[:, :n_queries]
    answer = values.gather(1, asked[..., None].expand(B, n_queries, 2))
    return _frame(task, body, keys.gather(1, asked)[..., None], answer,
                  start.gather(1, asked)[:, 0])


def niah_multivalue(draw, B, S, haystack="noise", n_values=4, n_distract=2) -> TaskBatch:
    body = _haystack(draw, B, _body_len(S, 1, n_values), haystack)
    keys = draw.distinct(B, 1 + n_distract, *VOCAB.keys)
    values = draw.distinct(B, n_values + n_distract, *VOCAB.values)
    item_keys = torch.cat([keys[:, :1].expand(B, n_values), keys[:, 1:]], dim=1)
    items = torch.stack([torch.full_like(values, VOCAB.needle), item_keys, values], dim=-1)
    start = _place(draw, body, items)
    answer = values[:, :n_values]                           # a random order: distinct draws
    return _frame("niah_multivalue", body, keys[:, None, :1], answer[:, None],
                  start[:, :n_values].float().mean(1))


def variable_tracking(draw, B, S, haystack="noise", hops=2, n_chains=3,
                      n_queries=1) -> TaskBatch:
    if not 1 <= n_queries <= n_chains:
        raise ValueError(f"n_queries must be in [1, n_chains = {n_chains}], got {n_queries}")
    chain = hops + 1
    body = _haystack(draw, B, _body_len(S, 1, chain, n_queries), haystack)
    names = draw.distinct(B, n_chains * chain, *VOCAB.keys).view(B, n_chains, chain)
    values = draw.distinct(B, n_chains, *VOCAB.values)
    src = torch.cat([values[..., None], names[..., :-1]], dim=-1)      # VAR v x1, VAR x1 x2, ...
    items = torch.stack([torch.full_like(names, VOCAB.var), src, names], dim=-1)
    # a chain's statements keep their order: deal segments at random, sort them within a chain
    slots = draw.permutation(B, n_chains * chain).view(B, n_chains, chain).sort(-1).values
    start = _place(draw, body, items.flatten(1, 2), slots.flatten(1))
    return _frame("variable_tracking", body, values[:, :n_queries, None], names[:, :n_queries],
                  start[:, 0].float())


def common_words(draw, B, S, haystack="noise", n_common=3, common_frac=0.05) -> TaskBatch:
    lo, hi = VOCAB.noise
    L = _body_len(S, 0, n_common)
    common = draw.distinct(B, n_common, lo, hi).sort(dim=1).values
    # every other word uniform over the rest of the range: skip the common words in order
    body = draw.ints(lo, hi - n_common, (B, L))
    for i in range(n_common):
        body += (body >= common[:, i:i + 1]).long()
    count = max(1, round(common_frac * L))
    if count * n_common > L:
        raise ValueError(f"{n_common} words x {count} do not fit in {L} tokens")
    at = draw.permutation(B, L)[:, :count * n_common]
    body.scatter_(1, at, common.repeat_interleave(count, dim=1))
    nan = torch.full((B,), float("nan"), device=body.device)
    answer = common.gather(1, draw.permutation(B, n_common))   # a random order
    return _frame("common_words", body, body[:, None, :0], answer[:, None], nan)


_MAKERS = {"niah_single": lambda d, B, S, h, **p: niah(d, B, S, h, 1, "niah_single", **p),
           "niah_multikey": niah, "niah_multivalue": niah_multivalue,
           "variable_tracking": variable_tracking, "common_words": common_words}


def generate(task: str, batch: int, seq_len: int, *, seed: int = 0, device="cpu",
             haystack: str = "noise", **params) -> TaskBatch:
    """``batch`` samples of ``task`` of ``seq_len`` tokens each (prompt + answer), on ``device``.

    ``params`` are the task's own (``n_keys``, ``n_values``, ``n_distract``, ``hops``,
    ``n_chains``, ``n_common``, ``common_frac``; see the module docstring).
    """
    if task not in _MAKERS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    return _MAKERS[task](_Draw(seed, device), batch, seq_len, haystack, **params)


def answer_len(task: str, **params) -> int:
    """Tokens in one answer of ``task`` with ``params`` (defaults of the generator)."""
    if task in ("niah_single", "niah_multikey"):
        return 2
    if task == "niah_multivalue":
        return params.get("n_values", 4)
    if task == "variable_tracking":
        return params.get("hops", 2) + 1
    return params.get("n_common", 3)


# Parameters of the evaluation: what the benchmark and the demo ask.
EVAL_PARAMS = {"niah_single": {}, "niah_multikey": {"n_keys": 8},
               "niah_multivalue": {"n_values": 4, "n_distract": 2},
               "variable_tracking": {"hops": 2, "n_chains": 3},
               "common_words": {"n_common": 3, "common_frac": 0.05}}


def training_params(task: str, rng: random.Random, seq_len: int) -> dict:
    """Task parameters drawn for one training sub-batch (varied, so the model does not learn one
    count): 2-16 multi-key needles (fewer when short), 2-4 values, 1-3 hops; multi-key needles
    ask about up to 8 keys, variable tracking about every chain (more answers per sequence)."""
    if task == "niah_multikey":
        n = rng.randint(2, max(2, min(16, seq_len // 24)))
        return {"n_keys": n, "n_queries": rng.randint(1, min(n, 8))}
    if task == "niah_multivalue":
        return {"n_values": rng.randint(2, 4), "n_distract": rng.randint(0, 3)}
    if task == "variable_tracking":
        n = rng.randint(1, 4)
        return {"hops": rng.randint(1, 3), "n_chains": n, "n_queries": rng.randint(1, n)}
    return dict(EVAL_PARAMS[task])


COPY_PERIOD = (8, 64)       # the copy warm-up's phrase: 8 to 64 tokens, one length per batch


def copy_batch(batch: int, seq_len: int, *, seed: int, device="cpu",
               period: tuple[int, int] = COPY_PERIOD) -> tuple[torch.Tensor, torch.Tensor]:
    """The induction warm-up of training (not one of ``TASKS``): ``(tokens, mask)``, both
    (batch, seq_len). Each row is a random phrase of ``P`` tokens (P drawn once per batch from
    ``period``, at most seq_len / 2) over every non-marker token (noise, keys and values),
    repeated to fill the row; ``mask`` is True on the tokens a copy of the phrase predicts
    (position >= P). A next-token loss on them alone teaches the induction heads every lookup
    of the tasks is built from: unlike the repeated haystack's, it has no unpredictable token
    in it, and the phrase uses the key and value tokens the lookups copy."""
    draw = _Draw(seed, device)
    P = int(draw.ints(period[0], min(period[1], seq_len // 2) + 1, (1,)))
    phrase = draw.ints(VOCAB.noise[0], VOCAB.size, (batch, P))
    tokens = phrase.repeat(1, -(-seq_len // P))[:, :seq_len]
    mask = (torch.arange(seq_len, device=draw.device) >= P).expand(batch, seq_len)
    return tokens, mask


def mixed_batch(batch: int, seq_len: int, *, seed: int, device="cpu",
                tasks: tuple[str, ...] = TASKS) -> TaskBatch:
    """A training batch: ``batch`` rows dealt evenly over ``tasks``, each task's rows in one
    sub-batch with parameters and haystack drawn per sub-batch. The ``batch % len(tasks)`` rows
    left over go to tasks drawn per batch (always to the first ones, a batch of 4 over the
    five tasks never held common_words: the 32K stage of the H200 preset trained without it)."""
    rng = random.Random(seed)
    extra = set(rng.sample(range(len(tasks)), batch % len(tasks)))
    parts = []
    for i, task in enumerate(tasks):
        rows = batch // len(tasks) + (i in extra)
        if rows:
            parts.append(generate(task, rows, seq_len, seed=rng.getrandbits(62), device=device,
                                  haystack=rng.choice(HAYSTACKS),
                                  **training_params(task, rng, seq_len)))
    return TaskBatch.cat(parts)
