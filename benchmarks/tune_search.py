"""Time the pattern-search kernel over its variants and launch configs (GPU).

    python benchmarks/tune_search.py --seq-lens 32768,131072 --out results/
    python benchmarks/tune_search.py --variants masked,full --tj 64 --warps 4 --stages 1

Variants are ``pattern_search.SEARCH_VARIANTS`` (pass A's interior tiles: masked, unmasked with
the scale folded into exp2's argument, fp16 exponentials, ...); launch configs are the tile width
TJ, warps and stages. Every (variant, config)'s selection is first compared with the plain-torch
reference: rows whose kept set differs and the Jaccard index of the kept (query block, key block)
pairs over the whole call. Then the same with the mass guard on (``mass_floor`` 0.8, the
default), against the guarded reference. A difference is reported, not dropped. Times are GPU
medians (calls queued behind a sleep kernel, as in bench_attention.py). The variant and config
that pattern_search uses now are marked "current".

``--strides 1,2,4`` also runs the strided search (``FlashPrefillConfig.search_stride``: each
query block scored by every n-th of its rows). Its selection is checked against the strided
reference (the kernel's correctness, the columns above) and compared with the full search's
reference (stride 1): the Jaccard index there is what decides whether a stride could be a
default (issue 12 asks >= 0.98 at the default alpha).
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


def kept_mask(num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, H, n, M) bool: the kept key blocks of a compact selection."""
    M = idx.shape[-1]
    valid = torch.arange(M, device=idx.device) < num[..., None]
    return torch.zeros(idx.shape, dtype=torch.bool, device=idx.device).scatter_(
        -1, idx.long(), valid)


def compare(got, ref) -> dict:
    a, b = kept_mask(*got), kept_mask(*ref)
    union = int((a | b).sum())
    return dict(diff_rows=int((a != b).any(-1).sum()),
                jaccard=int((a & b).sum()) / union if union else 1.0,
                density_ratio=int(a.sum()) / max(1, int(b.sum())))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", default="32768,131072")
    p.add_argument("--variants", default=",".join(ps.SEARCH_VARIANTS))
    p.add_argument("--tj", default="64")
    p.add_argument("--tb", default="64", help="the mass pass's and pass B's tile widths")
    p.add_argument("--warps", default="4")
    p.add_argument("--stages", default="1")
    p.add_argument("--mass-floor", type=float, default=FlashPrefillConfig().mass_floor)
    p.add_argument("--strides", default="1", help="search_stride values (rows per block / n)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    cfg = FlashPrefillConfig()
    current = (ps.SEARCH_VARIANT, ps._launch_config(cfg.block_size, 128))
    rows = []
    for S in map(int, args.seq_lens.split(",")):
        q, k, _ = planted_qkv(1, 32, 8, S, 128, seed=0, dtype=torch.bfloat16, device="cuda")
        scale = q.shape[-1] ** -0.5
        sel = (scale, cfg.block_size, cfg.alpha, cfg.sink_blocks, cfg.window_blocks,
               cfg.last_dense_blocks)
        full = {False: ps.pattern_search_reference(q, k, *sel),
                True: ps.pattern_search_reference(q, k, *sel, mass_floor=args.mass_floor)}
        original = ps._launch_config
        for stride, variant, tj, tb, warps, stages in itertools.product(
                map(int, args.strides.split(",")),
                args.variants.split(","), map(int, args.tj.split(",")),
                map(int, args.tb.split(",")), map(int, args.warps.split(",")),
                map(int, args.stages.split(","))):
            launch = dict(TJ=tj, TB=tb, num_warps=warps, num_stages=stages)
            ps._launch_config = lambda *a, launch=launch: launch
            guarded = dict(mass_floor=args.mass_floor, return_mass=True)
            ref, ref_mass = full[False], full[True]
            if stride > 1:
                ref = ps.pattern_search_reference(q, k, *sel, row_stride=stride)
                ref_mass = ps.pattern_search_reference(q, k, *sel, row_stride=stride,
                                                       mass_floor=args.mass_floor)
            try:
                row = dict(S=S, stride=stride, variant=variant, **launch,
                           current=(variant, launch) == current and stride == 1)
                got = ps.pattern_search(q, k, *sel, variant=variant, row_stride=stride)
                row.update(compare(got, ref))
                row["jaccard_vs_full"] = compare(got, full[False])["jaccard"]
                got = ps.pattern_search(q, k, *sel, variant=variant, row_stride=stride,
                                        **guarded)[:2]
                row.update({f"mass_{key}": v for key, v in compare(got, ref_mass).items()})
                row["mass_jaccard_vs_full"] = compare(got, full[True])["jaccard"]
                row["ms"], row["spread"] = cuda_time(
                    lambda: ps.pattern_search(q, k, *sel, variant=variant, row_stride=stride),
                    args.reps)
                row["mass_ms"], _ = cuda_time(
                    lambda: ps.pattern_search(q, k, *sel, variant=variant, row_stride=stride,
                                              **guarded),
                    args.reps)
            except Exception as e:  # noqa: BLE001 (a config that fails to compile is reported)
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            finally:
                ps._launch_config = original
            rows.append(row)
            print(json.dumps(row), flush=True)
        q = k = ref = ref_mass = full = None   # free the length's tensors
        torch.cuda.empty_cache()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "tune_search.json"), "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "rows": rows}, f, indent=1)
    print("\n| S | stride | variant | TJ | TB | warps | stages | search ms | with mass guard ms "
          "| rows differing / Jaccard vs reference | guarded: rows / Jaccard | Jaccard vs full "
          "search / guarded |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        head = (f"| {r['S']} | {r['stride']} | {r['variant']} | {r['TJ']} | {r['TB']} | "
                f"{r['num_warps']} | {r['num_stages']}")
        if "error" in r:
            print(f"{head} | failed: {r['error'][:80]} | | | | |")
        else:
            print(f"{head} | {r['ms']:.3f} | {r['mass_ms']:.3f} | {r['diff_rows']} / "
                  f"{r['jaccard']:.5f} | {r['mass_diff_rows']} / {r['mass_jaccard']:.5f} | "
                  f"{r['jaccard_vs_full']:.5f} / {r['mass_jaccard_vs_full']:.5f} |"
                  + (" (current)" if r["current"] else ""))


if __name__ == "__main__":
    main()
