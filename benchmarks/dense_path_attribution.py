"""Where the default op's time goes when it runs dense (structure-less input), on the GPU.

At each length, random q/k (logit std 1; B=1, H=32, Hkv=8, D=128, bf16), GPU time of calls
queued behind a sleep kernel (CUDA events, median), each step adding one piece of the op's
dense path: cuDNN alone; cuDNN + ``.contiguous()`` (what the opaque op returns); the probe
search alone; the probe + its host read (``dispatch.probe``); ``dispatch.run`` (probe, read,
cuDNN); and the op through ``flash_prefill`` (custom-op wrappers included). Also prints the
stride of cuDNN's output. Every op output is checked equal to cuDNN's in the same run.

    python benchmarks/dense_path_attribution.py [--seq-lens 8192,16384,32768]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fp_compile import FlashPrefillConfig, dispatch, flash_prefill  # noqa: E402
from fp_compile.demo.bench import cuda_time  # noqa: E402
from fp_compile.kernels.pattern_search import pattern_search  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-lens", default="8192,16384,32768")
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    cfg = FlashPrefillConfig(min_seq_len=0)
    print("| S | cuDNN | + contiguous | probe search | probe + host read | dispatch.run | "
          "flash_prefill | op == cuDNN | cuDNN out stride |")
    print("|---|---|---|---|---|---|---|---|---|")
    for S in (int(s) for s in args.seq_lens.split(",")):
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(1, 32, S, 128, generator=g, device="cuda").bfloat16()
        k = torch.randn(1, 8, S, 128, generator=g, device="cuda").bfloat16()
        v = torch.randn(1, 8, S, 128, generator=g, device="cuda").bfloat16()
        scale = 128 ** -0.5
        M = -(-S // cfg.block_size)
        rows = dispatch.probe_rows(M)
        reps = args.reps

        def search():
            return pattern_search(q, k, scale, cfg.block_size, cfg.alpha, cfg.sink_blocks,
                                  cfg.window_blocks, cfg.last_dense_blocks,
                                  mass_floor=cfg.mass_floor, rows=rows)

        ref = dispatch.dense(q, k, v, scale)
        out = flash_prefill(q, k, v, enable_gqa=True, config=cfg)
        same = bool(torch.equal(out, ref))
        t = [cuda_time(lambda: dispatch.dense(q, k, v, scale), reps)[0],
             cuda_time(lambda: dispatch.dense(q, k, v, scale).contiguous(), reps)[0],
             cuda_time(search, reps)[0],
             cuda_time(lambda: dispatch.probe(q, k, scale, cfg)[0], reps)[0],
             cuda_time(lambda: dispatch.run(q, k, v, scale, cfg), reps)[0],
             cuda_time(lambda: flash_prefill(q, k, v, enable_gqa=True, config=cfg), reps)[0]]
        print(f"| {S} | " + " | ".join(f"{x:.3f}" for x in t)
              + f" | {same} | {tuple(ref.stride())} |", flush=True)


if __name__ == "__main__":
    main()
