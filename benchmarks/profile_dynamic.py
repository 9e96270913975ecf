"""Where a dynamic-shape call's extra host time goes (issue 12): static vs dynamic=True graphs.

For each config (the defaults, ``paper_rule()``) at each length, one causal SDPA call compiled
with the backend twice (``dynamic=False`` / ``dynamic=True``), host-synced median times, then a
``torch.profiler`` trace (CPU + CUDA) of a few host-synced calls of each, written as Chrome
traces under --out and summarised: the host's time from the call's start to its first kernel
launch, its total CPU time per call, and the ops with the most self CPU time. Outputs are
checked against cuDNN in the same run.

    python benchmarks/profile_dynamic.py --out results/profile_dynamic
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fp_compile  # noqa: E402
from fp_compile import FlashPrefillConfig, dispatch  # noqa: E402
from fp_compile.demo.bench import poison_allocator, rel_err  # noqa: E402
from fp_compile.demo.synthetic import planted_qkv  # noqa: E402

from bench_dynamic import Attention, cudnn  # noqa: E402


def synced_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def first_launch_us(trace_path: str) -> list[float]:
    """Per 'call' range in the trace: microseconds from its start to the first kernel launch."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    calls = sorted((e for e in events if e.get("name") == "call" and e.get("ph") == "X"),
                   key=lambda e: e["ts"])
    launches = sorted(e["ts"] for e in events if e.get("ph") == "X" and e.get("cat") in
                      ("cuda_runtime", "cuda_driver") and "aunch" in e.get("name", ""))
    out = []
    for c in calls:
        first = next((t for t in launches if t >= c["ts"]), None)
        out.append(None if first is None else round(first - c["ts"], 1))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-lens", default="9001,33000")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default="profile_dynamic")
    p.add_argument("--configs", default="default,paper", help="default and / or paper")
    p.add_argument("--variant", default=None,
                   help="the opaque op's attention variant (dispatch.ATTENTION_VARIANT)")
    p.add_argument("--with-stack", action="store_true",
                   help="record Python functions in the traces (slower host; for attribution)")
    args = p.parse_args(argv)
    if args.variant:
        dispatch.ATTENTION_VARIANT = args.variant
    os.makedirs(args.out, exist_ok=True)
    rows = []
    with torch._dynamo.config.patch(recompile_limit=64):
        configs = {"default": FlashPrefillConfig(), "paper": FlashPrefillConfig.paper_rule()}
        for name in args.configs.split(","):
            cfg = configs[name]
            dynamic = torch.compile(Attention(), backend=fp_compile.make_backend(cfg),
                                    dynamic=True)
            for S in [int(s) for s in args.seq_lens.split(",")]:
                q, k, v = planted_qkv(1, 32, 8, S, 128, seed=0, dtype=torch.bfloat16,
                                      device="cuda")
                dense = cudnn(q, k, v)
                static = torch.compile(Attention(), backend=fp_compile.make_backend(cfg),
                                       dynamic=False)
                for kind, fn in (("static", static), ("dynamic", dynamic)):
                    poison_allocator(q)
                    out = fn(q, k, v)
                    row = {"config": name, "S": S, "graph": kind, "err": rel_err(out, dense)}
                    del out
                    row["synced_ms"] = synced_ms(lambda fn=fn: fn(q, k, v), args.reps)
                    path = os.path.join(args.out, f"trace_{name}_{S}_{kind}.json")
                    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                                 with_stack=args.with_stack) as prof:
                        for _ in range(3):
                            torch.cuda.synchronize()
                            with record_function("call"):
                                fn(q, k, v)
                            torch.cuda.synchronize()
                    prof.export_chrome_trace(path)
                    row["first_launch_us"] = first_launch_us(path)
                    print(json.dumps(row), flush=True)
                    print(prof.key_averages().table(sort_by="self_cpu_time_total",
                                                    row_limit=18), flush=True)
                    rows.append(row)
    with open(os.path.join(args.out, "profile_dynamic.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
