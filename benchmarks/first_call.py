"""Time of the op's first call in a fresh process (B=1, H=32, Hkv=8, D=128, bf16, standard
inputs), eager and compiled. Run it with empty caches, e.g.
``TRITON_CACHE_DIR=$(mktemp -d) TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python benchmarks/first_call.py``.
Prints the host-synced wall time of the first and second call of each.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fp_compile import FlashPrefillConfig, flash_prefill  # noqa: E402
from fp_compile.demo.synthetic import planted_qkv  # noqa: E402


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--mode", choices=("eager", "compiled"), default="eager")
    args = p.parse_args()
    q, k, v = planted_qkv(1, 32, 8, args.seq_len, 128, seed=0, dtype=torch.bfloat16,
                          device="cuda")
    cfg = FlashPrefillConfig()

    def op(q, k, v):
        return flash_prefill(q, k, v, enable_gqa=True, config=cfg)

    fn = torch.compile(op, dynamic=False) if args.mode == "compiled" else op
    first = timed(lambda: fn(q, k, v))
    second = timed(lambda: fn(q, k, v))
    print(f"{args.mode} S={args.seq_len}: first call {first:.2f} s, second {second * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
