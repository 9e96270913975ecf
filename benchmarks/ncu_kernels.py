"""Run the search and the attention kernels once each inside a profiler range, for Nsight
Compute (GPU): the counters say what bounds each kernel (tensor pipe, MUFU, L2, DRAM).

    ncu --clock-control none --profile-from-start off --set detailed -o prof \
        python3 benchmarks/ncu_kernels.py --seq-lens 32768,131072

Every kernel is launched once before the range (compiled and warm); inside it the paper rule's
search, the guarded search (mass floor 0.8) and the attention on the default selection
(``dispatch.ATTENTION_VARIANT``) run once per length, on the benchmark's standard inputs
(planted_qkv(1, 32, 8, S, 128), seed 0, bf16).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fp_compile import FlashPrefillConfig, dispatch  # noqa: E402
from fp_compile.demo.synthetic import planted_qkv  # noqa: E402
from fp_compile.kernels.block_sparse_attention_tma import block_sparse_attention_variant  # noqa: E402,E501
from fp_compile.kernels.pattern_search import pattern_search  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", default="32768,131072")
    args = p.parse_args()
    cfg = FlashPrefillConfig()
    for S in (int(s) for s in args.seq_lens.split(",")):
        q, k, v = planted_qkv(1, 32, 8, S, 128, seed=0, dtype=torch.bfloat16, device="cuda")
        scale = 128 ** -0.5
        bs = cfg.block_size

        def search(floor):
            return pattern_search(q, k, scale, bs, cfg.alpha, cfg.sink_blocks, cfg.window_blocks,
                                  cfg.last_dense_blocks, mass_floor=floor)

        def attend(num, idx):
            return block_sparse_attention_variant(q, k, v, num, idx, scale, bs,
                                                  variant=dispatch.ATTENTION_VARIANT)
        num, idx = search(cfg.mass_floor)
        out = attend(num, idx)
        search(0.0)
        torch.cuda.synchronize()
        density = num.sum().item() / (32 * (S // bs) * (S // bs + 1) / 2)
        print(f"S={S}: density {density:.4f}, output finite {bool(out.isfinite().all())}")
        torch.cuda.cudart().cudaProfilerStart()
        search(0.0)
        search(cfg.mass_floor)
        attend(num, idx)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
