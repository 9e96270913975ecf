"""Accuracy benchmark: error, recall and density of the paper's rule and each beyond-paper option.

    python benchmarks/bench_accuracy.py --device cuda --out results/     # H200: about 1 minute
    python benchmarks/bench_accuracy.py --device cpu --out /tmp/acc/     # CPU: S 4K-16K, ~2 min

Inputs: fp_compile.demo.synthetic.planted_qkv (sink, local window, salient spans, retrieval, vertical
columns, slash lines), several seeds. For each (S, seed, alpha) the selection is made by the
plain-torch reference (same selection as the kernels) and compared on ``--rows`` query rows drawn
from the second half of the prompt: rel L2 error of block-sparse vs dense attention, attention
recall (share of the exact softmax mass inside the kept blocks) and density (kept causal blocks /
all causal blocks). Variants: paper (``FlashPrefillConfig.paper_rule``), +vertical_slash (the
probe on the last query block; +vs_rows32 / +vs_rows16: on the prompt's last 32 / 16 rows),
+mean_correction, +gqa_shared, and all three (``--variants`` picks some). Prints a table and a
summary (error summed over cases vs the paper's rule, cases worse than the paper's, max density
increase); writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fp_compile import FlashPrefillConfig  # noqa: E402
from fp_compile import accuracy as acc  # noqa: E402
from fp_compile.kernels.pattern_search import select_mask_reference  # noqa: E402
from fp_compile.demo.synthetic import planted_qkv  # noqa: E402

VARIANTS = {
    "paper": {},
    "+vertical_slash": {"vertical_slash": True},
    "+vs_rows32": {"vertical_slash": True, "vs_rows": 32},
    "+vs_rows16": {"vertical_slash": True, "vs_rows": 16},
    "+mean_correction": {"mean_correction": True},
    "+gqa_shared": {"gqa_shared": True},
    "+all": {"vertical_slash": True, "mean_correction": True, "gqa_shared": True},
}


def measure(q, k, v, cfg: FlashPrefillConfig, rows) -> dict:
    scale = 1 / math.sqrt(q.shape[-1])
    t0 = time.perf_counter()
    keep = select_mask_reference(q, k, scale, cfg.block_size, cfg.alpha, cfg.sink_blocks,
                                     cfg.window_blocks, cfg.last_dense_blocks, cfg.gqa_shared,
                                     cfg.vertical_slash, cfg.vs_threshold,
                                     vs_rows=cfg.vs_rows)
    M = keep.shape[-1]
    density = float(keep.sum()) / (keep.shape[0] * keep.shape[1] * M * (M + 1) / 2)
    recall = float(acc.mask_recall(q, k, keep, scale, cfg.block_size, rows).mean())
    sparse, dense = acc.sparse_and_dense_rows(q, k, v, keep, scale, cfg.block_size, rows,
                                              cfg.mean_correction)
    return dict(density=density, recall=recall, rel_err=acc.rel_l2(sparse, dense),
                seconds=time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seq-lens", default=None, help="comma list (default GPU 4K-32K, CPU 4K-16K)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--alphas", default="0.08,0.12,0.18")
    p.add_argument("--heads", type=int, default=None, help="default GPU 32, CPU 8")
    p.add_argument("--kv-heads", type=int, default=None, help="default GPU 8, CPU 2")
    p.add_argument("--head-dim", type=int, default=None, help="default GPU 128, CPU 64")
    p.add_argument("--rows", type=int, default=512, help="query rows measured per case")
    p.add_argument("--out", default=None, help="folder for bench_accuracy.json")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma list of variants (paper always runs: the others are against it)")
    args = p.parse_args()
    variants = {"paper": VARIANTS["paper"]}
    for name in args.variants.split(","):
        if name not in VARIANTS:
            p.error(f"--variants: unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        variants[name] = VARIANTS[name]
    gpu = args.device.startswith("cuda")
    seq_lens = [int(s) for s in (args.seq_lens or ("4096,8192,16384,32768" if gpu else
                                                   "4096,8192,16384")).split(",")]
    H = args.heads or (32 if gpu else 8)
    Hkv = args.kv_heads or (8 if gpu else 2)
    D = args.head_dim or (128 if gpu else 64)
    seeds = [int(s) for s in args.seeds.split(",")]
    alphas = [float(a) for a in args.alphas.split(",")]
    if not gpu:
        torch.set_num_threads(os.cpu_count() or 1)

    results = []
    head = f"{'S':>6} {'seed':>4} {'alpha':>5} {'variant':>17} {'density':>8} {'recall':>7} {'rel_err':>8}"
    print(head)
    print("-" * len(head))
    for S in seq_lens:
        for seed in seeds:
            q, k, v = planted_qkv(1, H, Hkv, S, D, seed=seed, device=args.device,
                                  dtype=torch.float32)
            rows = acc.sample_rows(S, args.rows, seed=seed, device=args.device)
            for alpha in alphas:
                for name, opts in variants.items():
                    cfg = FlashPrefillConfig.paper_rule(alpha=alpha, **opts)
                    r = measure(q, k, v, cfg, rows)
                    r.update(S=S, seed=seed, alpha=alpha, variant=name)
                    results.append(r)
                    print(f"{S:>6} {seed:>4} {alpha:>5.2f} {name:>17} {r['density']:>8.4f} "
                          f"{r['recall']:>7.4f} {r['rel_err']:>8.4f}", flush=True)

    print("\nsummary per alpha (cases: S x seeds), against the paper's rule at the same alpha")
    summary = []
    for alpha in alphas:
        base = {(r["S"], r["seed"]): r for r in results
                if r["alpha"] == alpha and r["variant"] == "paper"}
        for name in variants:
            rs = [r for r in results if r["alpha"] == alpha and r["variant"] == name]
            err = sum(r["rel_err"] for r in rs)
            base_err = sum(base[(r["S"], r["seed"])]["rel_err"] for r in rs)
            row = dict(alpha=alpha, variant=name, err_sum=err,
                       err_change=err / base_err - 1,
                       worse=sum(r["rel_err"] > base[(r["S"], r["seed"])]["rel_err"] + 1e-9
                                 for r in rs),
                       mean_density=sum(r["density"] for r in rs) / len(rs),
                       max_density_increase=max(r["density"] - base[(r["S"], r["seed"])]["density"]
                                                for r in rs),
                       mean_recall=sum(r["recall"] for r in rs) / len(rs))
            summary.append(row)
            print(f"alpha {alpha:.2f} {name:>17}: err sum {err:.4f} ({100 * row['err_change']:+.1f}%),"
                  f" worse cases {row['worse']}/{len(rs)}, mean density {row['mean_density']:.4f}"
                  f" (max +{100 * row['max_density_increase']:.2f} pts),"
                  f" mean recall {row['mean_recall']:.4f}")

    if args.out:
        os.makedirs(args.out, exist_ok=True)
        meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                    device=(torch.cuda.get_device_name() if gpu else "cpu"),
                    torch=torch.__version__, B=1, H=H, Hkv=Hkv, D=D, rows=args.rows,
                    block_size=FlashPrefillConfig().block_size)
        path = os.path.join(args.out, "bench_accuracy.json")
        with open(path, "w") as f:
            json.dump(dict(meta=meta, results=results, summary=summary), f, indent=1)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
