"""The vertical/slash probe on the GPU (issue 14): Triton kernel vs the plain-torch reference.

Per length: GPU time (calls queued, median) of ``vertical_slash_scores`` with 8 and 4 warps,
with and without the diagonal sums, of the flags from the kernel and from the reference; in the
same run, the kernel's scores against the reference's (max abs difference) and whether the
flags are equal. B 1, H 32, Hkv 8, D 128, bf16, block 128, ``planted_qkv`` seed 0.

    python benchmarks/bench_vs_probe.py --out results/bench_vs_probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fp_compile.demo.bench import cuda_time  # noqa: E402
from fp_compile.demo.synthetic import planted_qkv  # noqa: E402
from fp_compile.kernels import vertical_slash as vs  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-lens", default="32768,131072")
    p.add_argument("--threshold", type=float, default=0.015)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = []
    for S in [int(s) for s in args.seq_lens.split(",")]:
        q, k, _ = planted_qkv(1, 32, 8, S, 128, seed=0, dtype=torch.bfloat16, device="cuda")
        scale, bs, thr = 128 ** -0.5, 128, args.threshold
        col, diag = vs.vertical_slash_scores(q, k, scale, bs)
        ref_col, ref_diag = vs.vertical_slash_scores_reference(q, k, scale, bs)
        got = vs.flags_from_scores(col, diag, bs, thr)
        want = vs.flags_from_scores(ref_col, ref_diag, bs, thr)
        row = {"S": S, "column_max_diff": (col - ref_col).abs().max().item(),
               "diagonal_max_diff": (diag - ref_diag).abs().max().item(),
               "flags_equal": bool(torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])),
               "heavy_column_blocks": int(want[0].sum()),
               "heavy_diagonal_blocks": int(want[1].sum())}
        del ref_col, ref_diag
        for w in (8, 4):
            for diagonals in (True, False):
                key = f"scores_w{w}" + ("" if diagonals else "_columns_only") + "_ms"
                row[key] = cuda_time(lambda w=w, d=diagonals: vs.vertical_slash_scores(
                    q, k, scale, bs, num_warps=w, diagonals=d), args.reps)[0]
        row["flags_kernel_ms"] = cuda_time(
            lambda: vs.vertical_slash_flags(q, k, scale, bs, thr), args.reps)[0]
        row["flags_reference_ms"] = cuda_time(
            lambda: vs.vertical_slash_flags(q, k, scale, bs, thr, kernel=False), 3)[0]
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
