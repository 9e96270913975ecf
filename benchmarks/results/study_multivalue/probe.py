"""Shipped model: per-position hits / repeats for multivalue and common words, and multivalue with
its value tokens remapped into the noise range (do fed members get suppressed there?)."""
import sys, torch
torch.set_num_threads(1)
from fp_compile.demo import tasks as ft, trained as tr

L = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
N, BS = 100, 10
model, meta = tr.load_trained_model("cpu")
fwd = tr.tail_forward(model)

def stats(task, remap=False):
    k = ft.answer_len(task, **ft.EVAL_PARAMS[task])
    hit = torch.zeros(k); rep = torch.zeros(k); full = 0
    g = torch.Generator().manual_seed(0)
    for i in range(N // BS):
        b = ft.generate(task, BS, L, seed=tr.EVAL_SEED + 104729 * L + i, **ft.EVAL_PARAMS[task])
        tok = b.tokens.clone()
        if remap:   # value token v -> a noise token, one fixed random map per batch
            lo, hi = ft.VOCAB.values
            perm = torch.randperm(ft.VOCAB.noise[1] - ft.VOCAB.noise[0], generator=g)[:hi - lo]
            isv = (tok >= lo) & (tok < hi)
            tok[isv] = perm[tok[isv] - lo] + ft.VOCAB.noise[0]
            b = ft.TaskBatch(tok, b.answer_mask, b.task_ids, b.depth)
        with torch.no_grad():
            lg = fwd(tok)
        S, T = tok.shape[1], lg.shape[1]
        pred = lg[:, :-1].argmax(-1)
        tgt, m = tok[:, S - T + 1:], b.answer_mask[:, S - T + 1:]
        h = ft.answer_hits(pred, tgt, m, ft.is_set(b.task_ids))[:, -k:]
        pa, ta = pred[:, -k:], tgt[:, -k:]
        hit += h.float().sum(0); full += int(h.all(-1).sum())
        for t in range(k):
            rep[t] += float((pa[:, t:t + 1] == ta[:, :t]).any(-1).sum())
    print(f"{task}{' remapped' if remap else ''} L={L}: set match {full / N:.2f} hit "
          f"{[round(x, 2) for x in (hit / N).tolist()]} repeat {[round(x, 2) for x in (rep / N).tolist()]}",
          flush=True)

stats("common_words"); stats("niah_multivalue"); stats("niah_multivalue", remap=True)
