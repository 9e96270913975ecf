"""Time the pattern-search kernel over launch configs (GPU): tile width TJ, warps, stages.

    python benchmarks/tune_search.py --seq-lens 32768,131072 --out results/

Every config's selection is first compared with the plain-torch reference (rows whose kept
count or kept set differ are reported; a config with a difference is marked, not dropped).
Times are GPU medians (calls queued behind a sleep kernel, as in bench_attention.py). The
config that pattern_search uses now is marked "current".
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fp_compile.demo.bench import cuda_time  # noqa: E402
from fp_compile import FlashPrefillConfig  # noqa: E402
from fp_compile.kernels import pattern_search as ps  # noqa: E402
from fp_compile.demo.synthetic import planted_qkv  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", default="32768,131072")
    p.add_argument("--tj", default="32,64,128")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--stages", default="1,2")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    cfg = FlashPrefillConfig()
    current = ps._launch_config(cfg.block_size, 128)
    rows = []
    for S in map(int, args.seq_lens.split(",")):
        q, k, _ = planted_qkv(1, 32, 8, S, 128, seed=0, dtype=torch.bfloat16, device="cuda")
        scale = q.shape[-1] ** -0.5
        sel = (scale, cfg.block_size, cfg.alpha, cfg.sink_blocks, cfg.window_blocks,
               cfg.last_dense_blocks)
        ref_num, ref_idx = ps.pattern_search_reference(q, k, *sel)
        original = ps._launch_config
        for tj, warps, stages in itertools.product(
                map(int, args.tj.split(",")), map(int, args.warps.split(",")),
                map(int, args.stages.split(","))):
            launch = dict(TJ=tj, num_warps=warps, num_stages=stages)
            ps._launch_config = lambda *a, launch=launch: launch
            try:
                num, idx = ps.pattern_search(q, k, *sel)
                diff_rows = int((num != ref_num).sum())
                same_count = num == ref_num
                kept_diff = int(((idx != ref_idx) & same_count[..., None]).any(-1).sum())
                ms, spread = cuda_time(lambda: ps.pattern_search(q, k, *sel), args.reps)
                row = dict(S=S, **launch, ms=ms, spread=spread, diff_rows=diff_rows,
                           kept_diff=kept_diff, current=launch == current)
            except Exception as e:  # noqa: BLE001 (a config that fails to compile is reported)
                row = dict(S=S, **launch, error=f"{type(e).__name__}: {e}"[:200])
            finally:
                ps._launch_config = original
            rows.append(row)
            print(json.dumps(row), flush=True)
        del q, k, ref_num, ref_idx
        torch.cuda.empty_cache()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "tune_search.json"), "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "rows": rows}, f, indent=1)
    print(f"\nS | TJ | warps | stages | search ms | rows differing from the reference")
    for r in rows:
        if "error" in r:
            print(f"{r['S']} | {r['TJ']} | {r['num_warps']} | {r['num_stages']} | failed: "
                  f"{r['error'][:60]}")
        else:
            print(f"{r['S']} | {r['TJ']} | {r['num_warps']} | {r['num_stages']} | "
                  f"{r['ms']:.3f} | {r['diff_rows']} count, {r['kept_diff']} set"
                  + (" (current)" if r["current"] else ""))


if __name__ == "__main__":
    main()
