"""The opaque op's host time per call, by Python function (issue 12: dynamic shapes).

Under ``dynamic=True`` (and always with the dense fallback on) the op runs as the opaque custom
op, its kernels launched from Python; this profiles that host path with cProfile over many
calls of ``torch.ops.fp_compile.flash_prefill_eager`` and prints the functions with the most
own and cumulative time, and the host microseconds per call (with the GPU kept busy, so the
host never waits for it, except the dense fallback's own read of its flags).

    python benchmarks/profile_host.py --seq-len 33000
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fp_compile import FlashPrefillConfig, dispatch  # noqa: E402
from fp_compile.demo.synthetic import planted_qkv  # noqa: E402
from fp_compile.ops import op_config_args  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=33000)
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--top", type=int, default=30, help="functions listed (0: no cProfile)")
    p.add_argument("--configs", default="paper,default")
    p.add_argument("--variants", default=dispatch.ATTENTION_VARIANT,
                   help="attention variants (dispatch.ATTENTION_VARIANT), comma-separated")
    args = p.parse_args(argv)
    q, k, v = planted_qkv(1, 32, 8, args.seq_len, 128, seed=0, dtype=torch.bfloat16,
                          device="cuda")
    configs = {"paper": FlashPrefillConfig.paper_rule(), "default": FlashPrefillConfig()}
    original = dispatch.ATTENTION_VARIANT
    for name, variant in itertools.product(args.configs.split(","), args.variants.split(",")):
        dispatch.ATTENTION_VARIANT = variant
        try:
            profile_one(q, k, v, f"{name} ({variant})", configs[name], args)
        finally:
            dispatch.ATTENTION_VARIANT = original


def profile_one(q, k, v, name, cfg, args) -> None:
    """Host time per call of one config's opaque op, then (--top) its cProfile."""
    flat = (None, *op_config_args(cfg), -1)

    def call():
        return torch.ops.fp_compile.flash_prefill_eager(q, k, v, *flat)

    ref = call()
    torch.cuda.synchronize()
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.calls):
        call()
    host = (time.perf_counter() - t0) / args.calls * 1e6
    torch.cuda.synchronize()
    gpu = (time.perf_counter() - t0) / args.calls * 1e6
    out = call()
    torch.cuda.synchronize()
    from fp_compile.kernels.fast_launch import _LAUNCHERS

    print(f"== {name} S={args.seq_len}: host {host:.0f} us/call while queueing, "
          f"{gpu:.0f} us/call with the GPU's work; output equal to the first call: "
          f"{bool(torch.equal(out, ref))}; cached launches so far: "
          f"{sum(f.hits for f in _LAUNCHERS.values())}", flush=True)
    if args.top:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            call()
        prof.disable()
        torch.cuda.synchronize()
        for key in ("tottime", "cumulative"):
            pstats.Stats(prof).sort_stats(key).print_stats(args.top)


if __name__ == "__main__":
    main()
