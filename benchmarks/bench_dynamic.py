"""Dynamic shapes vs static (issue 12): one SDPA call compiled with the backend, per length.

For each config (the defaults and ``paper_rule()``) and each length: a graph compiled for that
length alone (``dynamic=False``, a fresh ``torch.compile`` per length) against one graph compiled
with ``dynamic=True`` for every length (one compile serves all; the count of compiled graphs is
reported). Times: GPU time of calls queued behind a sleep kernel and host-synced time (each call
followed by a synchronize: the host's per-call work shows there), medians; and ``--paired``
pairs of host-synced calls of the two graphs in alternation (the median of the per-pair
ratios: drift on a shared machine moved the separate medians by up to 10%). Correctness in the
same run: each output (poisoned memory) vs cuDNN on the same inputs, and dynamic vs static.

    python benchmarks/bench_dynamic.py --out results/bench_dynamic.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fp_compile  # noqa: E402
from fp_compile import FlashPrefillConfig  # noqa: E402
from fp_compile.demo.bench import cuda_time, poison_allocator, rel_err  # noqa: E402
from fp_compile.demo.synthetic import planted_qkv  # noqa: E402


class Attention(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def cudnn(q, k, v):
    return torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, False, 0.0, True, False, scale=q.shape[-1] ** -0.5)[0]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-lens", default="9001,33000,70001,131072")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--paired", type=int, default=100,
                   help="pairs of host-synced calls, static and dynamic in alternation")
    p.add_argument("--configs", default="default,paper", help="default and / or paper")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    lengths = [int(s) for s in args.seq_lens.split(",")]
    inputs = {S: planted_qkv(1, 32, 8, S, 128, seed=0, dtype=torch.bfloat16, device="cuda")
              for S in lengths}
    result = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "rows": []}
    import triton

    result["triton"] = triton.__version__
    # Every compile here is of the same forward: lift dynamo's per-function recompile limit
    # (8) for this benchmark only, else later compiles silently run eagerly.
    with torch._dynamo.config.patch(recompile_limit=64):
        run(lengths, inputs, args, result)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


def paired_synced_ms(first, second, reps: int) -> tuple[float, float, float]:
    """Host-synced times of two functions called in alternation (the order swapped every pair),
    so drift on the machine hits both alike: (median ms of first, of second, median of the
    per-pair ratios second / first)."""
    a, b, ratios = [], [], []
    for i in range(reps):
        pair = []
        for fn in ((first, second) if i % 2 == 0 else (second, first)):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            pair.append((time.perf_counter() - t0) * 1e3)
        ta, tb = pair if i % 2 == 0 else pair[::-1]
        a.append(ta)
        b.append(tb)
        ratios.append(tb / ta)
    return statistics.median(a), statistics.median(b), statistics.median(ratios)


def run(lengths, inputs, args, result) -> None:
    configs = {"default": FlashPrefillConfig(), "paper": FlashPrefillConfig.paper_rule()}
    for name in args.configs.split(","):
        cfg = configs[name]
        dynamic_backend = fp_compile.make_backend(cfg)
        dynamic = torch.compile(Attention(), backend=dynamic_backend, dynamic=True)
        for S in lengths:
            q, k, v = inputs[S]
            dense = cudnn(q, k, v)
            row = {"config": name, "S": S}
            static_backend = fp_compile.make_backend(cfg)
            static = torch.compile(Attention(), backend=static_backend, dynamic=False)
            outs = {}
            for kind, fn in (("static", static), ("dynamic", dynamic)):
                poison_allocator(q)
                outs[kind] = fn(q, k, v)
                row[f"{kind}_err"] = rel_err(outs[kind], dense)
                row[f"{kind}_finite"] = bool(outs[kind].isfinite().all())
                row[f"{kind}_ms"] = cuda_time(lambda fn=fn: fn(q, k, v), args.reps)[0]
                row[f"{kind}_synced_ms"] = cuda_time(lambda fn=fn: fn(q, k, v), args.reps,
                                                     sync=True)[0]
            row["dynamic_vs_static"] = rel_err(outs["dynamic"], outs["static"])
            row["dynamic_over_static"] = row["dynamic_ms"] / row["static_ms"]
            row["dynamic_over_static_synced"] = row["dynamic_synced_ms"] / row["static_synced_ms"]
            (row["static_paired_ms"], row["dynamic_paired_ms"],
             row["dynamic_over_static_paired"]) = paired_synced_ms(
                lambda: static(q, k, v), lambda: dynamic(q, k, v), args.paired)
            row["cudnn_ms"] = cuda_time(lambda: cudnn(q, k, v), args.reps)[0]
            row["dynamic_graphs_so_far"] = len(dynamic_backend.reports)
            row["static_graphs"] = len(static_backend.reports)   # 0: it ran eagerly
            del outs, dense
            print(json.dumps(row), flush=True)
            result["rows"].append(row)


if __name__ == "__main__":
    main()
