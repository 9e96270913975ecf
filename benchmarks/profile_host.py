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
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fp_compile import FlashPrefillConfig  # noqa: E402
from fp_compile.demo.synthetic import planted_qkv  # noqa: E402
from fp_compile.ops import op_config_args  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=33000)
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args(argv)
    q, k, v = planted_qkv(1, 32, 8, args.seq_len, 128, seed=0, dtype=torch.bfloat16,
                          device="cuda")
    for name, cfg in (("paper", FlashPrefillConfig.paper_rule()),
                      ("default", FlashPrefillConfig())):
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
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            out = call()
        prof.disable()
        torch.cuda.synchronize()
        print(f"== {name} S={args.seq_len}: host {host:.0f} us/call while queueing, "
              f"{gpu:.0f} us/call with the GPU's work; output equal to the first call: "
              f"{bool(torch.equal(out, ref))}", flush=True)
        for key in ("tottime", "cumulative"):
            pstats.Stats(prof).sort_stats(key).print_stats(args.top)


if __name__ == "__main__":
    main()
