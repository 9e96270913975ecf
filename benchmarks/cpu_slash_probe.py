"""CPU: the slash probe (``FlashPrefillConfig.slash_probe``) on the estimator study's inputs.

Per planted strength and seed (B 1, H 8, Hkv 2, D 128, fp32, block 128): the error (relative L2
over stratified eval rows, ``study_estimators.py``'s measure, after the dense fallback) and the
density of the defaults, of the defaults plus the library's probe at each kappa, and of the
study's own median probe (``median_probe_flags``, diagonals only) at its kappas 4 and 6. The
study's rule took the head's median and MAD over every offset, the unseen ones included at the
lowest float (a ``nan_to_num`` detail), which raises its threshold: its kappa 4 / 6 select what
the library's 6 / 8 select on these inputs.

    PYTHONPATH=. python benchmarks/cpu_slash_probe.py --seq-len 8192 --strengths 1,1.5,2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from study_estimators import (dense_fallback, evaluate, exact_rows,  # noqa: E402
                              median_probe_flags, stratified_rows)

from fp_compile import FlashPrefillConfig  # noqa: E402
from fp_compile.demo.synthetic import planted_qkv_with_info  # noqa: E402
from fp_compile.kernels.slash_probe import slash_probe_flags  # noqa: E402
from fp_compile.kernels.vertical_slash import add_vertical_slash  # noqa: E402
from fp_compile.selection import select_mask  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--strengths", default="1,1.5,2")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--kappas", default="4,6,8")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    S, bs, H, Hkv, D = args.seq_len, 128, 8, 2, 128
    M, scale = S // bs, D ** -0.5
    for strength in [float(x) for x in args.strengths.split(",")]:
        for seed in [int(x) for x in args.seeds.split(",")]:
            q, k, v, _ = planted_qkv_with_info(1, H, Hkv, S, D, seed=seed, strength=strength)
            cfg = FlashPrefillConfig(block_size=bs, min_seq_len=0)
            default = select_mask(q, k, scale, cfg)
            masks = {"default": default[0]}
            for kappa in (4.0, 6.0):
                f = median_probe_flags(q, k, scale, bs, kappa, columns=False)
                masks[f"study{kappa:g}"] = add_vertical_slash(default, *f)[0]
            row = {"S": S, "strength": strength, "seed": seed}
            for kappa in [float(x) for x in args.kappas.split(",")]:
                t = time.perf_counter()
                f = slash_probe_flags(q, k, scale, bs, kappa)
                row["probe_s"] = round(time.perf_counter() - t, 3)
                masks[f"lib{kappa:g}"] = add_vertical_slash(default, *f)[0]
            rows = stratified_rows(S, bs, 16, 0)
            mass, numer, _ = exact_rows(q, k, v, scale, rows, bs)
            dense_o = numer.sum(-2)
            norm = (dense_o ** 2).sum()
            for name, mask in masks.items():
                mask, _ = dense_fallback(mask, Hkv, cfg.dense_above)
                sq, _ = evaluate(mask, mass, numer, rows, bs, dense_o)
                row[name] = {"err": round(float((sq.sum() / norm).sqrt()), 4),
                             "density": round(float(mask.float().sum() / (H * M * (M + 1) / 2)),
                                              4)}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
