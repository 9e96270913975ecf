"""Train with fp_compile.demo.train's recipe, then score every task + multivalue per position."""
import json, sys, time
import torch
torch.set_num_threads(1)
from fp_compile.demo import train as T, tasks as ft, trained as tr

def mv_positions(model, seq_len, n=200, bs=50):
    fwd = tr.tail_forward(model)
    hits = torch.zeros(4); rep = torch.zeros(4); dis = torch.zeros(4); full = 0
    P = ft.EVAL_PARAMS["niah_multivalue"]
    with torch.no_grad():
        for i in range(n // bs):
            b = ft.generate("niah_multivalue", bs, seq_len, seed=tr.EVAL_SEED + 104729 * seq_len + i,
                            **P)
            logits = fwd(b.tokens)
            S, Tn = b.tokens.shape[1], logits.shape[1]
            pred = logits[:, :-1].argmax(-1)
            tgt, m = b.tokens[:, S - Tn + 1:], b.answer_mask[:, S - Tn + 1:]
            h = ft.answer_hits(pred, tgt, m, ft.is_set(b.task_ids))[:, -4:]
            pa, ta = pred[:, -4:], tgt[:, -4:]
            hits += h.float().sum(0)
            full += int(h.all(-1).sum())
            for t in range(4):
                fed = (pa[:, t:t + 1] == ta[:, :t]).any(-1)
                rep += 0
                rep[t] += float(fed.sum())
            # distractor values: in the body, tokens after NEEDLE k' with k' != asked key
            body = b.tokens
            nd = (body[:, :-2] == ft.VOCAB.needle)
            for r in range(bs):
                idx = nd[r].nonzero().flatten()
                vals = set(body[r, idx + 2].tolist()) - set(ta[r].tolist())
                for t in range(4):
                    dis[t] += pa[r, t].item() in vals
    return dict(hit=[round(x, 3) for x in (hits / n).tolist()],
                repeat=[round(x, 3) for x in (rep / n).tolist()],
                distract=[round(x, 3) for x in (dis / n).tolist()], set_match=full / n)

def patch_mv():
    import os
    hi = int(os.environ.get("MV_MAX", "4"))
    orig = ft.training_params
    def tp(task, rng, seq_len):
        if task == "niah_multivalue" and hi != 4:
            return {"n_values": rng.randint(2, hi), "n_distract": rng.randint(0, 3)}
        return orig(task, rng, seq_len)
    ft.training_params = tp
    print("MV_MAX", hi, flush=True)

def main(argv):
    patch_mv()
    import os; lengths = [int(x) for x in os.environ.get("EVAL_LENS", "128,256").split(",")]
    args = T.resolve(T.build_parser().parse_args(argv))
    args.log_every = 15.0
    model, log, summ = T.train(args)
    fwd = tr.tail_forward(model)
    res = dict(argv=argv, steps=summ["steps"], train_s=round(summ["train_seconds"], 1))
    t0 = time.perf_counter()
    with torch.no_grad():
        for L in lengths:
            res[f"acc{L}"] = {t: tr.evaluate(fwd, t, L, 100, batch_size=50) for t in ft.TASKS}
            res[f"mv{L}"] = mv_positions(model, L)
            print(L, res[f"acc{L}"], res[f"mv{L}"], flush=True)
    res["eval_s"] = round(time.perf_counter() - t0, 1)
    res["last_log"] = log[-1]
    print("RESULT", json.dumps(res), flush=True)

if __name__ == "__main__":
    main(sys.argv[1:])
