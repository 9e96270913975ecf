"""Run the search and the attention kernels once each inside a profiler range, for Nsight
Compute (GPU): the counters say what bounds each kernel (tensor pipe, MUFU, L2, DRAM).

    ncu --clock-control none --profile-from-start off --set detailed -o prof \
        python3 benchmarks/ncu_kernels.py --seq-lens 32768,131072

Every kernel is launched once before the range (compiled and warm); inside it the paper rule's
search, the guarded search (mass floor 0.8) and the attention on the default selection
(``dispatch.ATTENTION_VARIANT``) run once per length, on the benchmark's standard inputs
(planted_qkv(1, 32, 8, S, 128), seed 0, bf16). ``--probe-rows 0,32``: the vertical/slash
probe's kernels (``vertical_slash_flags`` at threshold 0.015, probe rows as
``FlashPrefillConfig.vs_rows``) too; ``--only-probe``: those alone.

    ncu --clock-control none --profile-from-start off --set detailed --print-summary none \
        python3 benchmarks/ncu_kernels.py --probe-rows 32 --only-probe
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
from fp_compile.kernels.vertical_slash import vertical_slash_flags  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", default="32768,131072")
    p.add_argument("--probe-rows", default="", help="e.g. 0,32: also the vertical/slash probe")
    p.add_argument("--only-probe", action="store_true")
    args = p.parse_args()
    probe_rows = [int(r) for r in args.probe_rows.split(",") if r]
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
        def probe(rows):
            return vertical_slash_flags(q, k, scale, bs, 0.015, n_rows=rows or None)

        num, idx = search(cfg.mass_floor)
        out = attend(num, idx)
        search(0.0)
        for rows in probe_rows:
            flags = probe(rows)
            print(f"S={S}: probe rows {rows or bs}: {int(flags[0].sum())} column blocks, "
                  f"{int(flags[1].sum())} diagonal blocks flagged")
        torch.cuda.synchronize()
        density = num.sum().item() / (32 * (S // bs) * (S // bs + 1) / 2)
        print(f"S={S}: density {density:.4f}, output finite {bool(out.isfinite().all())}")
        torch.cuda.cudart().cudaProfilerStart()
        if not args.only_probe:
            search(0.0)
            search(cfg.mass_floor)
            attend(num, idx)
        for rows in probe_rows:
            probe(rows)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
