"""Every GPU launch config of the block-sparse attention kernel, timed per length and input.

For each length and input (planted strength 1, the standard inputs; random q/k, where the
selection keeps every block), the selection of the default config's search (guards on, dense
fallback not applied: the kernel runs every kept block), then the kernel with each config of
``_gpu_tiles`` (GPU time, calls queued, median) and its output against the first config's
(relative L2; every config computes the same attention up to fp32 summation order).

    python benchmarks/tune_attention.py [--seq-lens 8192,32768,131072]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fp_compile import FlashPrefillConfig  # noqa: E402
from fp_compile.demo.bench import cuda_time, rel_err  # noqa: E402
from fp_compile.demo.synthetic import planted_qkv  # noqa: E402
from fp_compile.kernels.block_sparse_attention import (_gpu_tiles,  # noqa: E402
                                                       block_sparse_attention)
from fp_compile.kernels.pattern_search import pattern_search  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-lens", default="8192,32768,131072")
    p.add_argument("--inputs", default="planted,random")
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args()
    cfg = FlashPrefillConfig()
    tiles = _gpu_tiles(cfg.block_size, 128, 2)
    print("| S | input | density | " + " | ".join(f"{t}" for t in tiles) + " | best |")
    print("|---|---|---|" + "---|" * (len(tiles) + 1))
    for S in (int(s) for s in args.seq_lens.split(",")):
        for kind in args.inputs.split(","):
            if kind == "planted":
                q, k, v = planted_qkv(1, 32, 8, S, 128, seed=0, dtype=torch.bfloat16,
                                      device="cuda")
            else:
                g = torch.Generator(device="cuda").manual_seed(0)
                q, k, v = (torch.randn(1, h, S, 128, generator=g, device="cuda").bfloat16()
                           for h in (32, 8, 8))
            scale = 128 ** -0.5
            num, idx = pattern_search(q, k, scale, cfg.block_size, cfg.alpha, cfg.sink_blocks,
                                      cfg.window_blocks, cfg.last_dense_blocks,
                                      mass_floor=cfg.mass_floor)
            M = idx.shape[-1]
            density = num.sum().item() / (num.numel() * (M + 1) / 2)
            first = None
            cells = []
            reps = max(3, min(args.reps, int(4e5 / S)))
            for t in tiles:
                out = block_sparse_attention(q, k, v, num, idx, scale, cfg.block_size, tile=t)
                if first is None:
                    first = out
                err = rel_err(out, first)
                ms, _ = cuda_time(lambda: block_sparse_attention(
                    q, k, v, num, idx, scale, cfg.block_size, tile=t), reps)
                cells.append((ms, err))
            best = min(range(len(tiles)), key=lambda c: cells[c][0])
            print(f"| {S} | {kind} | {density:.3f} | "
                  + " | ".join(f"{ms:.3f} ({err:.0e})" for ms, err in cells)
                  + f" | {tiles[best]} |", flush=True)
            del q, k, v, num, idx, first


if __name__ == "__main__":
    main()
