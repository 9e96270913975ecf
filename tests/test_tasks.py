"""The task generator, checked by a plain-Python solver that reads only the prompt: every answer
is recoverable from its prompt, the layout holds, placement depth is uniform, seeds determine the
batch."""

from collections import Counter

import pytest
import torch

from fp_compile.demo import tasks as ft

V = ft.VOCAB


def solve(prompt: list[int]) -> list[int]:
    """The answer, from the prompt alone, by reading it as a person would."""
    assert prompt[0] == V.bos
    task = ft.TASKS[prompt[1] - V.task0]
    q = len(prompt) - 1 - prompt[::-1].index(V.query)      # the last QUERY
    assert prompt[q + 1] == prompt[1]
    body, asked = prompt[2:q], prompt[q + 2:]
    if task == "common_words":
        counts = Counter(body).most_common()
        n = next(i for i in range(1, len(counts)) if counts[i][1] < counts[0][1] / 2)
        return sorted(word for word, _ in counts[:n])        # a set: compared sorted
    needles = [body[i + 1:i + 4] for i, t in enumerate(body) if t == V.needle]
    if task in ("niah_single", "niah_multikey"):
        found = [s[1:3] for s in needles if s[0] == asked[0]]
        assert len(found) == 1
        return found[0]
    if task == "niah_multivalue":
        return sorted(s[1] for s in needles if s[0] == asked[0])
    # VAR a b: b takes a's value
    assign = {body[i + 2]: body[i + 1] for i, t in enumerate(body) if t == V.var}
    chain, last = [], asked[0]
    while True:
        nxt = [name for name, rhs in assign.items() if rhs == last]
        if not nxt:
            return chain
        assert len(nxt) == 1
        chain.append(nxt[0])
        last = nxt[0]


def _as_solved(task: str, answer: list[int]) -> list[int]:
    return sorted(answer) if task in ft.SET_TASKS else answer


CASES = [("niah_single", {}), ("niah_multikey", {"n_keys": 2}), ("niah_multikey", {"n_keys": 16}),
         ("niah_multivalue", {"n_values": 4, "n_distract": 2}),
         ("niah_multivalue", {"n_values": 2, "n_distract": 0}),
         ("variable_tracking", {"hops": 1, "n_chains": 1}),
         ("variable_tracking", {"hops": 3, "n_chains": 4}),
         ("common_words", {"n_common": 3, "common_frac": 0.05})]


@pytest.mark.parametrize("haystack", ft.HAYSTACKS)
@pytest.mark.parametrize("task, params", CASES)
@pytest.mark.parametrize("seq_len", [300, 1001])
def test_answers_are_recoverable_from_the_prompt(task, params, seq_len, haystack):
    batch = ft.generate(task, 6, seq_len, seed=seq_len, haystack=haystack, **params)
    assert batch.tokens.shape == batch.answer_mask.shape == (6, seq_len)
    assert batch.tokens.dtype == torch.long and batch.answer_mask.dtype == torch.bool
    assert (batch.task_ids == ft.TASKS.index(task)).all()
    for row in range(len(batch)):
        prompt, answer = batch.prompt(row), batch.answer(row)
        assert len(prompt) + len(answer) == seq_len
        assert solve(prompt) == _as_solved(task, answer), (task, row)


def test_layout_markers_only_where_they_belong():
    batch = ft.mixed_batch(20, 512, seed=1)
    assert (batch.tokens[:, 0] == V.bos).all() and (batch.tokens < V.size).all()
    for row in batch.tokens:
        body = row[2:row.tolist().index(V.query)]
        noise_or_item = (body >= V.noise[0]) | (body == V.needle) | (body == V.var)
        assert noise_or_item.all()                 # no BOS / QUERY / task marker inside
    # answers: values for needles, names for variables, words for common words
    for row in range(len(batch)):
        task, answer = ft.TASKS[batch.task_ids[row]], batch.answer(row)
        lo, hi = {"variable_tracking": V.keys, "common_words": V.noise}.get(task, V.values)
        assert all(lo <= t < hi for t in answer), (task, answer)


def test_mixed_batch_covers_every_task_and_is_deterministic():
    a = ft.mixed_batch(17, 256, seed=5)
    b = ft.mixed_batch(17, 256, seed=5)
    c = ft.mixed_batch(17, 256, seed=6)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.answer_mask, b.answer_mask)
    assert not torch.equal(a.tokens, c.tokens)
    assert sorted(set(a.task_ids.tolist())) == list(range(len(ft.TASKS)))
    for row in range(len(a)):
        assert solve(a.prompt(row)) == _as_solved(ft.TASKS[a.task_ids[row]], a.answer(row))


def test_generate_is_deterministic_per_seed():
    a = ft.generate("variable_tracking", 3, 400, seed=9, hops=3)
    b = ft.generate("variable_tracking", 3, 400, seed=9, hops=3)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, ft.generate("variable_tracking", 3, 400, seed=10,
                                                  hops=3).tokens)


@pytest.mark.parametrize("task, params", [("niah_single", {}), ("niah_multikey", {"n_keys": 8})])
def test_queried_needle_depth_is_uniform(task, params):
    depth = ft.generate(task, 4000, 512, seed=2, **params).depth
    assert depth.min() >= 0 and depth.max() < 1
    # ten equal bins of the body: each within a generous band of a tenth
    body = (depth * 512 - 2) / (512 - 12)
    hist = torch.histc(body, bins=10, min=0, max=1) / len(depth)
    assert hist.min() > 0.07 and hist.max() < 0.13, hist


def test_chain_statements_keep_their_order():
    batch = ft.generate("variable_tracking", 50, 600, seed=3, hops=3, n_chains=3)
    for row in range(len(batch)):
        prompt = batch.prompt(row)
        at = {prompt[i + 2]: i for i, t in enumerate(prompt) if t == V.var}   # VAR a b: b set
        names = batch.answer(row)
        assert [at[n] for n in names] == sorted(at[n] for n in names)


def test_repeat_haystack_repeats_a_phrase():
    batch = ft.generate("common_words", 2, 200, seed=0, haystack="repeat")  # words: no haystack
    assert (batch.tokens[:, 2:-5] >= V.noise[0]).all()
    hay = ft.generate("niah_single", 8, 600, seed=0, haystack="repeat").tokens[:, 2:-5]
    for row in hay:
        period = next(p for p in range(ft.PHRASE_LEN[0], ft.PHRASE_LEN[1] + 1)
                      if (row[p:] == row[:-p]).float().mean() > 0.95)   # all but the needle
        assert len(set(row[:period].tolist())) > period // 2


@pytest.mark.parametrize("task, params, match", [
    ("niah_multikey", {"n_keys": 40}, "do not fit"),
    ("common_words", {"n_common": 3, "common_frac": 0.5}, "do not fit"),
    ("nope", {}, "unknown task"),
    ("niah_single", {"haystack": "essays"}, "unknown haystack"),
])
def test_bad_parameters_raise(task, params, match):
    with pytest.raises(ValueError, match=match):
        ft.generate(task, 2, 128, **params)


@pytest.mark.parametrize("task, params", [("niah_multikey", {"n_keys": 6, "n_queries": 4}),
                                          ("variable_tracking", {"hops": 2, "n_chains": 3,
                                                                 "n_queries": 3})])
def test_several_questions_each_answered_by_the_prompt_before_it(task, params):
    batch = ft.generate(task, 4, 700, seed=4, **params)
    n = params["n_queries"]
    for row in range(len(batch)):
        tokens, mask = batch.tokens[row].tolist(), batch.answer_mask[row].tolist()
        ends = [i + 1 for i in range(len(mask))
                if mask[i] and (i + 1 == len(mask) or not mask[i + 1])]
        starts = [i for i in range(len(mask)) if mask[i] and not mask[i - 1]]
        assert len(ends) == len(starts) == n
        answers = [tokens[a:b] for a, b in zip(starts, ends)]
        assert [solve(tokens[:a]) for a in starts] == answers
        assert len({tuple(a) for a in answers}) == n       # different keys / chains asked


@pytest.mark.parametrize("task, params", CASES)
def test_answer_len_matches_the_generator(task, params):
    assert len(ft.generate(task, 1, 300, **params).answer(0)) == ft.answer_len(task, **params)


def test_set_answers_come_in_a_random_order():
    for task in ft.SET_TASKS:
        batch = ft.generate(task, 200, 300, seed=1, **ft.EVAL_PARAMS[task])
        rows = [batch.answer(i) for i in range(len(batch))]
        ascending = sum(r == sorted(r) for r in rows) / len(rows)
        assert ascending < 0.3, (task, ascending)            # 1/6 for 3 members, 1/24 for 4
        last_max = sum(r[-1] == max(r) for r in rows) / len(rows)
        assert last_max < 0.5, (task, last_max)


def test_answer_options_are_the_token_itself_and_a_set_s_members_not_yet_fed():
    mask = torch.tensor([[0, 1, 1, 0, 1, 1, 1]] * 2, dtype=torch.bool)   # two answers per row
    options = ft.answer_options(mask, torch.tensor([False, True]))
    assert torch.equal(options[0], torch.eye(7, dtype=torch.bool))
    later = {(1, 2), (4, 5), (4, 6), (5, 6)}                # within an answer, never across
    expected = [[t == j or (t, j) in later for j in range(7)] for t in range(7)]
    assert options[1].tolist() == expected
    assert ft.is_set(torch.arange(len(ft.TASKS))).tolist() == [t in ft.SET_TASKS
                                                                for t in ft.TASKS]


def test_mixed_batch_deals_the_rows_left_over_to_every_task_in_turn():
    # 4 rows over 5 tasks (the H200 preset's 32K stage): each task gets rows in some batches
    seen = Counter()
    for seed in range(20):
        batch = ft.mixed_batch(4, 128, seed=seed)
        assert len(batch) == 4 and len(set(batch.task_ids.tolist())) == 4
        seen.update(batch.task_ids.tolist())
    assert set(seen) == set(range(len(ft.TASKS))) and min(seen.values()) >= 8
