"""Fine-tune the shipped weights on CPU with the training loss (+ options), then score.
usage: finetune.py STEPS [repeat_weight] [set_rows] [mv_extra_rows]"""
import json, sys, time, random
import torch
torch.set_num_threads(1)
from fp_compile.demo import train as T, tasks as ft, trained as tr
sys.path.insert(0, "/work/mv_runs")
from exp import mv_positions

steps = int(sys.argv[1]); rw = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
set_rows = int(sys.argv[3]) if len(sys.argv) > 3 else 0
L, B, LR = 512, 10, 3e-4
torch.manual_seed(0)
model, meta = tr.load_trained_model("cpu")
model.train()
decay = [p for p in model.parameters() if p.dim() == 2]
other = [p for p in model.parameters() if p.dim() < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                         {"params": other, "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.95))
t0 = time.perf_counter()
for step in range(steps):
    for g in opt.param_groups:
        g["lr"] = LR * min(1.0, (step + 1) / 10)
    b = ft.mixed_batch(B, L, seed=step)
    total, loss, ok, right = T.answer_loss(model, b.tokens, b.answer_mask, 0.0,
                                           ft.is_set(b.task_ids), rw)
    tok, m = ft.copy_batch(8, 256, seed=step + 5 * 10 ** 6)
    total = total + T.copy_loss(model, tok, m)
    if set_rows:
        tok, m = ft.set_batch(set_rows, 128, seed=step + 6 * 10 ** 6)
        total = total + T.answer_loss(model, tok, m, 0.0, m[:, -1], rw)[0]
    opt.zero_grad(); total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    if step % 10 == 0:
        print(f"step {step} {time.perf_counter() - t0:.0f}s loss {float(loss):.3f}", flush=True)
train_s = time.perf_counter() - t0
model.eval(); fwd = tr.tail_forward(model)
res = dict(steps=steps, repeat_weight=rw, set_rows=set_rows, train_s=round(train_s, 1))
with torch.no_grad():
    for Le in (1024,):
        res[f"acc{Le}"] = {t: tr.evaluate(fwd, t, Le, 50, batch_size=10) for t in ft.TASKS}
        res[f"mv{Le}"] = mv_positions(model, Le, n=100, bs=20)
res["total_s"] = round(time.perf_counter() - t0, 1)
print("RESULT", json.dumps(res), flush=True)
