"""The guards on the H200: the op vs cuDNN on inputs with and without attention structure.

Grid: ``planted_qkv`` at strengths 0, 0.25, 0.5, 0.75, 1, 1.5, 2 and random q/k at logit scales
1 and 3 (q, k ~ N(0, 1), q times the scale, so that scale * q.k / sqrt(D) has that std), at
each length. Per cell: cuDNN time, and for ``paper_rule()`` and the default config the op's
time, density, kv groups run dense and relative L2 error of the output vs cuDNN's (same run,
poisoned output memory). Times are GPU time of calls queued behind a sleep kernel (CUDA events,
median); the op's host decision (one small device-to-host copy) is inside the timed calls.
Each config's "x cuDNN" divides cuDNN's median by the op's, both from one queue that alternates
op and cuDNN calls (``paired_time``; since run 46); "alone" times the op by itself against
"cuDNN ms", cuDNN timed alone before and after the configs (the mean of the two medians).
Neither is free of bias: pairs give the op the GPU's slower state right after a long dense
call (at 128K, run 47), while alone the two are timed at different moments (clock drift,
run 41).

``--slash-probe 6,8`` adds a row "slash<kappa>" per kappa (the default config with
``slash_probe=kappa``) and, per cell, the probe's own time (``slash_probe_flags``, with each
median method of ``slash_probe_scores``), the diagonal block offsets it flags per head and, on
planted inputs, the share of (slash head, planted offset) pairs whose blocks it flags.

    python benchmarks/bench_guards.py --out results/ [--seq-lens 8192,32768,131072]
    python benchmarks/bench_guards.py --seq-lens 32768,131072 --slash-probe 6,8 \
        --cells "planted 1,planted 1.5,planted 2,random 1" --out results/
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fp_compile  # noqa: E402
from fp_compile import FlashPrefillConfig, flash_prefill  # noqa: E402
from fp_compile.demo.bench import SLEEP_CYCLES, cuda_time, poison_allocator, rel_err  # noqa: E402
from fp_compile.demo.synthetic import planted_qkv_with_info  # noqa: E402
from fp_compile.kernels import slash_probe as sp  # noqa: E402

STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
SIGMAS = (1.0, 3.0)


def inputs(kind: str, value: float, S: int, args, dtype, with_info: bool = False):
    """q, k, v (and, with_info, planted_qkv_with_info's info; None for random inputs)."""
    B, H, Hkv, D = 1, args.heads, args.kv_heads, args.head_dim
    if kind == "planted":
        *qkv, info = planted_qkv_with_info(B, H, Hkv, S, D, seed=args.seed, strength=value,
                                           dtype=dtype, device="cuda")
        return (*qkv, info) if with_info else tuple(qkv)
    g = torch.Generator(device="cuda").manual_seed(args.seed)
    q = torch.randn(B, H, S, D, generator=g, device="cuda") * value
    k = torch.randn(B, Hkv, S, D, generator=g, device="cuda")
    v = torch.randn(B, Hkv, S, D, generator=g, device="cuda")
    qkv = q.to(dtype), k.to(dtype), v.to(dtype)
    return (*qkv, None) if with_info else qkv


def cudnn(q, k, v):
    return torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, False, 0.0, True, False, scale=q.shape[-1] ** -0.5)[0]


def paired_time(fn, baseline, reps: int, warmup: int = 2) -> tuple[float, float]:
    """GPU-time medians (ms) of fn and baseline, timed alternately (fn, baseline, fn, ...) in
    one queue behind a sleep kernel, so that a clock drift between cells or configs (cuDNN
    at 32K: 12.6-14.8 ms in run 13, 13.75-14.87 ms in run 41) moves both alike."""
    for _ in range(warmup):
        fn()
        baseline()
    torch.cuda.synchronize()
    events = [[torch.cuda.Event(enable_timing=True) for _ in range(4)] for _ in range(reps)]
    torch.cuda._sleep(SLEEP_CYCLES)
    for e in events:
        e[0].record()
        fn()
        e[1].record()
        e[2].record()
        baseline()
        e[3].record()
    torch.cuda.synchronize()
    return (statistics.median(e[0].elapsed_time(e[1]) for e in events),
            statistics.median(e[2].elapsed_time(e[3]) for e in events))


def measure(q, k, v, cfg: FlashPrefillConfig, dense_out, reps: int) -> dict:
    fp_compile.reset_stats()
    poison_allocator(q)
    out = flash_prefill(q, k, v, enable_gqa=True, config=cfg.replace(collect_stats=True))
    (row,) = fp_compile.stats().rows
    res = {"finite": bool(out.isfinite().all()), "err": rel_err(out, dense_out),
           "density": row.density, "dense_heads": row.n_dense_heads,
           "min_mass": row.min_mass}
    del out
    res["ms"], res["cudnn_paired_ms"] = paired_time(
        lambda: flash_prefill(q, k, v, enable_gqa=True, config=cfg), lambda: cudnn(q, k, v),
        reps)
    # Alone too: right after a long dense call the GPU runs slower (run 47: the paper rule at
    # 128K took 14.2 ms paired against 11.7 ms alone), which the pairs charge to the op.
    res["alone_ms"], _ = cuda_time(lambda: flash_prefill(q, k, v, enable_gqa=True, config=cfg),
                                   reps)
    return res


def probe_cell(q, k, info, cfg: FlashPrefillConfig, kappas, reps: int) -> dict:
    """The slash probe alone: its time (each median method), the diagonal block offsets it
    flags per head (mean) and, on planted inputs, the share of the planted lines it finds."""
    scale = q.shape[-1] ** -0.5
    bs = cfg.block_size
    res = {}
    for median in sp.MEDIANS:
        res[f"probe_{median}_ms"], _ = cuda_time(
            lambda m=median: sp.slash_probe_flags(q, k, scale, bs, kappas[0], median=m), reps)
    for kappa in kappas:
        diagonal = sp.slash_probe_flags(q, k, scale, bs, kappa)[1]
        res[f"slash{kappa:g}_flagged"] = float(diagonal.float().sum(-1).mean())
        if info is not None:
            pairs = [(h, o) for h, kind in enumerate(info["kinds"]) if kind == "slash"
                     for o in info["offsets"]]
            found = [bool(diagonal[0, h, o // bs]) for h, o in pairs]
            res[f"slash{kappa:g}_lines"] = sum(found) / max(1, len(found))
    return res


def attribute(S: int, args, dtype, default: FlashPrefillConfig) -> dict:
    """Where the default config's time goes against the paper's rule, on planted strength 1."""
    from fp_compile.kernels.pattern_search import pattern_search

    q, k, v = inputs("planted", 1.0, S, args, dtype)
    reps = max(3, min(args.reps, int(4e5 / S)))
    cfg = default
    sargs = (q, k, q.shape[-1] ** -0.5, cfg.block_size, cfg.alpha, cfg.sink_blocks,
             cfg.window_blocks, cfg.last_dense_blocks)
    row = {"S": S, "input": "planted 1"}
    row["search_paper_ms"], _ = cuda_time(lambda: pattern_search(*sargs), reps)
    row["search_mass_ms"], _ = cuda_time(
        lambda: pattern_search(*sargs, mass_floor=cfg.mass_floor), reps)
    for name, c in (("op_paper", FlashPrefillConfig.paper_rule(alpha=cfg.alpha)),
                    ("op_guard_no_host_decision", cfg.replace(dense_above=1.0)),
                    ("op_default", cfg)):
        row[f"{name}_ms"], _ = cuda_time(
            lambda c=c: flash_prefill(q, k, v, enable_gqa=True, config=c.replace(min_seq_len=0)),
            reps)
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", default="8192,32768,131072")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--config", default="{}", help="FlashPrefillConfig fields (JSON) of 'default'")
    p.add_argument("--floors", default="",
                   help="also the default config with each of these mass_floor values")
    p.add_argument("--cells", default="", help="only these inputs, e.g. 'planted 1,random 3'")
    p.add_argument("--slash-probe", default="",
                   help="also the default config with slash_probe at each of these kappas "
                        "(rows 'slash<kappa>'), and the probe's own time per cell")
    p.add_argument("--attribution", default="",
                   help="lengths at which to split the default's cost on 'planted 1': the "
                        "search with and without the mass pass, the op with and without the "
                        "dense fallback's host decision")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    dtype = torch.bfloat16
    default = FlashPrefillConfig(**json.loads(args.config))
    paper = FlashPrefillConfig.paper_rule(alpha=default.alpha)
    configs = {"paper": paper, "default": default}
    for floor in filter(None, args.floors.split(",")):
        configs[f"floor{floor}"] = default.replace(mass_floor=float(floor))
    kappas = [float(x) for x in args.slash_probe.split(",") if x]
    for kappa in kappas:
        configs[f"slash{kappa:g}"] = default.replace(slash_probe=kappa)
    cells = [("planted", s) for s in STRENGTHS] + [("random", s) for s in SIGMAS]
    if args.cells:
        wanted = {c.strip() for c in args.cells.split(",")}
        cells = [(kind, v) for kind, v in cells if f"{kind} {v:g}" in wanted]
    rows = []
    for S in [int(s) for s in args.seq_lens.split(",")]:
        reps = max(3, min(args.reps, int(4e5 / S)))
        for kind, value in cells:
            q, k, v, info = inputs(kind, value, S, args, dtype, with_info=True)
            dense_out = cudnn(q, k, v)
            row = {"S": S, "input": f"{kind} {value:g}", "reps": reps}
            # cuDNN timed before and after the op's configs (the clock drifts between cells:
            # 12.6-14.8 ms at 32K in run 13); the mean of the two medians is the baseline
            before, _ = cuda_time(lambda: cudnn(q, k, v), reps)
            for name, cfg in configs.items():
                for key, val in measure(q, k, v, cfg, dense_out, reps).items():
                    row[f"{name}_{key}"] = val
            after, _ = cuda_time(lambda: cudnn(q, k, v), reps)
            row["cudnn_ms"], row["cudnn_before_ms"], row["cudnn_after_ms"] = (
                (before + after) / 2, before, after)
            for name in configs:
                # against cuDNN timed alternately with this config (paired_time)
                row[f"{name}_x"] = row[f"{name}_cudnn_paired_ms"] / row[f"{name}_ms"]
                row[f"{name}_x_alone"] = row["cudnn_ms"] / row[f"{name}_alone_ms"]
            if kappas:
                row.update(probe_cell(q, k, info, default, kappas, reps))
            rows.append(row)
            line = f"{S:>7} {row['input']:>12} cudnn {row['cudnn_ms']:8.2f}"
            for name in configs:
                line += (f" | {name} {row[name + '_ms']:7.2f} {row[name + '_x']:5.2f}x"
                         f" (alone {row[name + '_alone_ms']:.2f} {row[name + '_x_alone']:.2f}x)"
                         f" d {row[name + '_density']:.3f} dh {row[name + '_dense_heads']:>2}"
                         f" err {row[name + '_err']:.3f}"
                         + ("" if row[name + "_finite"] else " NONFINITE"))
            if kappas:
                line += " | probe " + " ".join(f"{m} {row[f'probe_{m}_ms']:.2f}"
                                               for m in sp.MEDIANS)
                for kappa in kappas:
                    line += (f" k{kappa:g} flagged {row[f'slash{kappa:g}_flagged']:.1f}"
                             + (f" lines {row[f'slash{kappa:g}_lines']:.2f}"
                                if info is not None else ""))
            print(line, flush=True)
            del q, k, v, dense_out
            torch.cuda.empty_cache()
    attribution = []
    for S in [int(s) for s in args.attribution.split(",") if s]:
        attribution.append(attribute(S, args, dtype, default))
        print(json.dumps(attribution[-1]), flush=True)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "argv": sys.argv[1:],
            "default_config": {k: getattr(default, k) for k in ("alpha", "mass_floor",
                                                                "dense_above", "min_seq_len")},
            "slash_probe_kappas": kappas}
    with open(os.path.join(args.out, "bench_guards.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "attribution": attribution}, f, indent=1)
    for name in configs:
        worst = min(r[f"{name}_x"] for r in rows)
        worst_alone = min(r[f"{name}_x_alone"] for r in rows)
        worst_err = max(r[f"{name}_err"] for r in rows)
        print(f"{name}: worst x cuDNN {worst:.3f} paired, {worst_alone:.3f} alone; worst rel "
              f"err {worst_err:.3f}")


if __name__ == "__main__":
    main()
