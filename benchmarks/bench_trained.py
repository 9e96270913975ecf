"""Task accuracy of the trained long-context model under the flashprefill pass, against dense.

    python benchmarks/bench_trained.py --device cuda --json results/bench_trained.json  # H200
    python benchmarks/bench_trained.py --device cpu                     # tiny: 1K-2K, a few prompts

The model is the shipped one (``fp_compile/demo/weights/longctx.safetensors``, or ``--weights``),
scored by ``fp_compile.demo.trained.evaluate``: exact match of every answer token (for the set
answers of multi-value needles and common words, any member not yet fed is right at each
position), teacher-forced in one prefill, on the same prompts for every config (``--n`` per
task and length). Configs:

* ``dense``: the model as is (eager SDPA);
* ``paper a=...``: ``FlashPrefillConfig.paper_rule(alpha=a, min_seq_len=0)`` for each ``--alphas``
  (the paper's selection at every length: the shipped ``min_seq_len`` would keep 4K-8K dense);
* ``defaults``: ``FlashPrefillConfig()`` as shipped (dense below ``min_seq_len`` = 16384);
* ``defaults min0``: the defaults with ``min_seq_len=0``, so the sparse path runs at every length;
* ``defaults min0 last0``: and ``last_dense_blocks=0``: the question and answer rows, which the
  last dense blocks otherwise cover, go through the selection too;
* ``calibrated r=...``: ``fp_compile.calibrate`` (per-layer alpha for recall ``--target-recall``,
  on the defaults with ``min_seq_len=0``) from two prompts per task at ``--calib-len``;
* ``dense greedy`` (``--greedy``): the dense model's own greedy answers on the same prompts
  (``trained.greedy_accuracy``: a prefill, then decode steps through the KV cache), which
  teacher forcing cannot judge: a set answer can repeat one of its own members.

Every sparse config runs through ``torch.compile`` with the pass: ``--compile trace`` (default)
runs the rewritten graph as dynamo traced it (the same op and kernels; no Inductor, so a config
compiles in seconds), ``--compile inductor`` the backend as users run it (``make_backend``).
Density: kept causal blocks / all causal blocks per layer and head from ``collect_stats``, a kv
group that ran dense counted as 1, averaged over layers, heads and prompts. Prints two markdown
tables (mean accuracy and density per config and length; accuracy per task) and writes JSON with
the GPU name, torch and Triton versions and the date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fp_compile  # noqa: E402
from fp_compile import FlashPrefillConfig  # noqa: E402
from fp_compile.demo import tasks as ft  # noqa: E402
from fp_compile.demo import trained as tr  # noqa: E402

DEFAULTS = {"cuda": dict(lengths="4096,8192,16384,32768,65536", n=40, batch=8, calib_len=16384,
                         dtype="bfloat16"),
            "cpu": dict(lengths="1024,2048", n=6, batch=6, calib_len=1024, dtype="float32")}


def configs(alphas, block_size: int, calibrated=None) -> dict:
    b = dict(block_size=block_size)
    out = {"dense": None}
    for a in alphas:
        out[f"paper a={a:g}"] = FlashPrefillConfig.paper_rule(alpha=a, min_seq_len=0, **b)
    out["defaults"] = FlashPrefillConfig(**b)
    out["defaults min0"] = FlashPrefillConfig(min_seq_len=0, **b)
    out["defaults min0 last0"] = FlashPrefillConfig(min_seq_len=0, last_dense_blocks=0, **b)
    if calibrated is not None:
        out.update(calibrated)
    return out


def _batch(S: int, args) -> int:
    """Prompts per prefill at length S (halved above 16K). The prompts depend on it (each batch
    is drawn from its own seed), so every row of a length uses the same value."""
    return args.batch if S <= 16384 else max(1, args.batch // 2)


def run_config(model, name, config, lengths, args) -> list[dict]:
    torch._dynamo.reset()
    if config is None:
        forward, reports = tr.tail_forward(model), []
    else:
        forward, reports = tr.compiled_forward(model, config.replace(collect_stats=True),
                                               inductor=args.compile == "inductor")
    out = []
    for S in lengths:
        fp_compile.reset_stats()
        t0 = time.perf_counter()
        acc = {task: tr.evaluate(forward, task, S, args.n, seed=args.seed, device=args.device,
                                 batch_size=_batch(S, args))
               for task in args.tasks}
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        rows = fp_compile.stats().rows
        row = dict(config=name, seq_len=S, accuracy=acc,
                   mean_accuracy=sum(acc.values()) / len(acc),
                   density=tr.effective_density(rows) if config is not None else 1.0,
                   sparse_calls=sum(r.sparse for r in rows), calls=len(rows),
                   seconds=round(seconds, 2))
        out.append(row)
        print(f"{name:>24} {S:>6}: mean acc {row['mean_accuracy']:.3f} density "
              f"{row['density']:.3f} ({row['sparse_calls']}/{row['calls']} calls sparse) "
              + " ".join(f"{t}={a:.2f}" for t, a in acc.items()) + f"  {seconds:.1f}s",
              flush=True)
    if reports:
        report = type(reports[0]).merge(reports)
        print(f"{'':>24} rewritten {len(report.rewritten)} SDPA call(s), left dense "
              f"{len(report.skipped)}")
    return out


def run_greedy(model, lengths, args) -> list[dict]:
    """The "dense greedy" rows: ``trained.greedy_accuracy`` per task and length, on the
    teacher-forced rows' prompts (the same ``_batch``)."""
    out = []
    for S in lengths:
        t0 = time.perf_counter()
        acc = {task: tr.greedy_accuracy(model, task, S, args.n, seed=args.seed,
                                        device=args.device, batch_size=_batch(S, args))
               for task in args.tasks}
        row = dict(config="dense greedy", seq_len=S, accuracy=acc,
                   mean_accuracy=sum(acc.values()) / len(acc), density=1.0, sparse_calls=0,
                   calls=0, seconds=round(time.perf_counter() - t0, 2))
        out.append(row)
        print(f"{'dense greedy':>24} {S:>6}: mean acc {row['mean_accuracy']:.3f} "
              + " ".join(f"{t}={a:.2f}" for t, a in acc.items()) + f"  {row['seconds']:.1f}s",
              flush=True)
    return out


def calibrated_configs(model, args) -> tuple[dict, list]:
    torch._dynamo.reset()
    base = FlashPrefillConfig(min_seq_len=0, block_size=args.block_size)
    samples = tr.sample_prompts(args.calib_len, per_task=2, seed=args.seed, device=args.device)
    out, reports = {}, []
    for r in args.target_recall:
        t0 = time.perf_counter()
        tuned, report = fp_compile.calibrate(tr.tail_forward(model), samples, target_recall=r,
                                             config=base)
        print(report)
        print(f"(calibrated in {time.perf_counter() - t0:.1f} s)", flush=True)
        out[f"calibrated r={r:g}"] = tuned
        reports.append(dict(target_recall=r, layers=report.as_dicts(),
                            layer_alpha=[list(p) for p in tuned.layer_alpha]))
        torch._dynamo.reset()
    return out, reports


def _label(S: int) -> str:
    return f"{S // 1024}K" if S % 1024 == 0 else str(S)


def tables(results, lengths, tasks) -> str:
    names = list(dict.fromkeys(r["config"] for r in results))
    cell = {(r["config"], r["seq_len"]): r for r in results}
    head = "| config | " + " | ".join(f"{_label(S)} acc / density" for S in lengths) + " |"
    lines = ["Mean accuracy over tasks (exact / set match) / density:", "", head,
             "|---" * (len(lengths) + 1) + "|"]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(
            f"{cell[n, S]['mean_accuracy']:.3f} / {cell[n, S]['density']:.3f}"
            for S in lengths) + " |")
    lines += ["", "Accuracy per task:", "",
              "| config | length | " + " | ".join(tasks) + " |",
              "|---" * (len(tasks) + 2) + "|"]
    for n in names:
        for S in lengths:
            acc = cell[n, S]["accuracy"]
            lines.append(f"| {n} | {_label(S)} | " + " | ".join(f"{acc[t]:.2f}" for t in tasks)
                         + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--weights", default=None, help="default: the shipped weights")
    p.add_argument("--lengths", help="comma list (default GPU 4K-64K, CPU 1K-2K)")
    p.add_argument("--n", type=int, help="prompts per task and length (GPU 40, CPU 6)")
    p.add_argument("--batch", type=int, help="prompts per prefill (halved above 16K)")
    p.add_argument("--tasks", default=",".join(ft.TASKS))
    p.add_argument("--alphas", default="0.04,0.08,0.12,0.2,0.3")
    p.add_argument("--target-recall", default="0.95", help="comma list; empty: no calibration")
    p.add_argument("--calib-len", type=int, help="calibration prompt length (GPU 16K, CPU 1K)")
    p.add_argument("--block-size", type=int, default=FlashPrefillConfig.block_size,
                   help="of every sparse config (64 gives the CPU's short prompts some sparsity)")
    p.add_argument("--compile", choices=["trace", "inductor"], default="trace")
    p.add_argument("--dtype", choices=["bfloat16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--greedy", action="store_true",
                   help="add a row 'dense greedy': the dense model's own greedy answers "
                   "(trained.greedy_accuracy: decode steps through the KV cache, one prompt "
                   "at a time), where the other rows are teacher-forced")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    for key, value in DEFAULTS["cuda" if args.device.startswith("cuda") else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    lengths = [int(s) for s in args.lengths.split(",")]
    args.tasks = args.tasks.split(",")
    args.target_recall = [float(r) for r in args.target_recall.split(",") if r]
    dtype = getattr(torch, args.dtype)

    model, meta = tr.load_trained_model(args.device, dtype, args.weights,
                                        max_seq_len=max(max(lengths), args.calib_len))
    t0 = time.perf_counter()
    with torch.no_grad():
        calibrated, calibration = ({}, []) if not args.target_recall else \
            calibrated_configs(model, args)
        results = []
        for name, config in configs([float(a) for a in args.alphas.split(",")],
                                    args.block_size, calibrated).items():
            results += run_config(model, name, config, lengths, args)
            if name == "dense" and args.greedy:
                results += run_greedy(model, lengths, args)
    torch._dynamo.reset()
    text = tables(results, lengths, args.tasks)
    print()
    print(text)
    print(f"\n{time.perf_counter() - t0:.0f} s in all")
    env = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
               device=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
               torch=torch.__version__, triton=_triton_version(), dtype=args.dtype,
               compile=args.compile, n=args.n, block_size=args.block_size,
               weights=str(args.weights or tr.WEIGHTS), model_args=meta["model_args"],
               eval_params=ft.EVAL_PARAMS, dense_accuracy_at_training=meta.get("dense_accuracy"))
    out = dict(env=env, calibration=calibration, results=results, table=text)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")
    return out


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
