"""A/B of the op's attention variant (``dispatch.ATTENTION_VARIANT``) on the guards' standard
input (planted strength 1), timed alone and alternately with cuDNN (``bench_guards.paired_time``).

    python benchmarks/ab_attention_variant.py [--seq-lens 32768,131072] [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_guards import cudnn, paired_time  # noqa: E402
from fp_compile import FlashPrefillConfig, dispatch, flash_prefill  # noqa: E402
from fp_compile.demo.bench import cuda_time, rel_err  # noqa: E402
from fp_compile.demo.synthetic import planted_qkv  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", default="32768,131072")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    for S in (int(s) for s in args.seq_lens.split(",")):
        q, k, v = planted_qkv(1, 32, 8, S, 128, seed=0, dtype=torch.bfloat16, device="cuda")
        dense = cudnn(q, k, v)
        for name, cfg in (("paper", FlashPrefillConfig.paper_rule()),
                          ("default", FlashPrefillConfig())):
            for variant in ("default", "tma_fold"):
                dispatch.ATTENTION_VARIANT = variant
                out = flash_prefill(q, k, v, enable_gqa=True, config=cfg)
                err = rel_err(out, dense)
                alone = cuda_time(lambda: flash_prefill(q, k, v, enable_gqa=True, config=cfg),
                                  args.reps)[0]
                op, base = paired_time(lambda: flash_prefill(q, k, v, enable_gqa=True,
                                                             config=cfg),
                                       lambda: cudnn(q, k, v), args.reps)
                print(f"S {S} {name:7} variant {variant:8} alone {alone:7.3f} ms | paired "
                      f"{op:7.3f} ms vs cuDNN {base:8.3f} ({base / op:5.2f}x) | err {err:.4f}",
                      flush=True)
        dispatch.ATTENTION_VARIANT = "tma_fold"


if __name__ == "__main__":
    main()
