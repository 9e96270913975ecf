"""Study (issue 12): what a strided search (``FlashPrefillConfig.search_stride``) does to the
selection, on the benchmark's planted inputs and on the shipped trained model's own q / k.

For each case and stride n it reports, against the full search (n = 1, every row of a query
block scores it), at the default alpha with the paper's rule (mass guard off) and with the mass
guard (the default floor): the Jaccard index of the kept (query block, key block) pairs, the
density of both, and the relative L2 error of the block-sparse output vs dense attention on
sampled query rows (plain torch, ``accuracy.sparse_and_dense_rows``). Issue 12 lets a
selection-changing search be a default only at Jaccard >= 0.98 at the default alpha.

Cases: ``planted<strength>`` is ``planted_qkv(1, 32, 8, S, 128)`` seed 0 (the benchmark's
inputs, strength 1 the standard one); ``trained p<i> L<l>`` is layer l's q / k / v of the
shipped model (``demo/trained.py``) on the i-th calibration prompt (one per task) at S. Inputs
are rounded to fp16 and computed in fp32 (CPU) or as given (GPU: bf16 via the same reference).

    PYTHONPATH=. python benchmarks/study_search_stride.py --seq-len 8192 --strides 2,4 \\
        --out benchmarks/results/study_search_stride
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fp_compile import FlashPrefillConfig  # noqa: E402
from fp_compile import accuracy as acc  # noqa: E402
from fp_compile.demo import trained  # noqa: E402
from fp_compile.demo.synthetic import planted_qkv  # noqa: E402
from fp_compile.kernels.search_reference import select_mask_reference  # noqa: E402


def trained_cases(S: int, prompts: int, device):
    """(name, q, k, v) of every layer of the trained model on the first ``prompts`` prompts."""
    model, _ = trained.load_trained_model(device, torch.float32, max_seq_len=S)
    real = F.scaled_dot_product_attention
    for p, (ids,) in enumerate(trained.sample_prompts(S, 1, device=device)[:prompts]):
        caught = []

        def spy(q, k, v, *args, **kwargs):
            caught.append((q.detach(), k.detach(), v.detach()))
            return real(q, k, v, *args, **kwargs)

        F.scaled_dot_product_attention = spy
        try:
            with torch.no_grad():
                model(ids)
        finally:
            F.scaled_dot_product_attention = real
        for layer, (q, k, v) in enumerate(caught):
            yield f"trained p{p} L{layer}", q, k, v


def planted_cases(S: int, strengths, device):
    for st in strengths:
        q, k, v = planted_qkv(1, 32, 8, S, 128, seed=0, strength=st, device=device)
        yield f"planted{st:g}", q, k, v


def study(name, q, k, v, strides, rows) -> list[dict]:
    cfg = FlashPrefillConfig()
    q, k, v = (t.half().float() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5
    sel = (scale, cfg.block_size, cfg.alpha, cfg.sink_blocks, cfg.window_blocks,
           cfg.last_dense_blocks)
    out = []
    for floor in (0.0, cfg.mass_floor):
        keeps, errs = {}, {}
        for n in (1, *strides):
            keeps[n] = select_mask_reference(q, k, *sel, mass_floor=floor, search_stride=n)
            sparse, dense = acc.sparse_and_dense_rows(q, k, v, keeps[n], scale, cfg.block_size,
                                                      rows)
            errs[n] = acc.rel_l2(sparse, dense)
        for n in strides:
            a, b = keeps[n], keeps[1]
            out.append(dict(case=name, mass_floor=floor, stride=n,
                            jaccard=int((a & b).sum()) / max(1, int((a | b).sum())),
                            density_full=float(b.float().mean()),
                            density=float(a.float().mean()),
                            err_full=errs[1], err=errs[n]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--strides", default="2,4")
    p.add_argument("--strengths", default="1,2")
    p.add_argument("--prompts", type=int, default=5, help="trained-model prompts (<= 5 tasks)")
    p.add_argument("--eval-rows", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    strides = [int(n) for n in args.strides.split(",")]
    rows = acc.sample_rows(args.seq_len, args.eval_rows, device=args.device)
    results, t0 = [], time.time()
    cases = [planted_cases(args.seq_len, [float(s) for s in args.strengths.split(",")],
                           args.device),
             trained_cases(args.seq_len, args.prompts, args.device)]
    for gen in cases:
        for name, q, k, v in gen:
            for r in study(name, q, k, v, strides, rows):
                results.append(r)
                print(json.dumps(r), flush=True)
    lines = [f"S = {args.seq_len}, default alpha, {args.eval_rows} sampled rows for the error; "
             f"{time.time() - t0:.0f} s on {args.device}.", "",
             "| case | mass floor | stride | Jaccard vs full | density full / strided | "
             "error full / strided |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['case']} | {r['mass_floor']:g} | {r['stride']} | {r['jaccard']:.4f} "
                     f"| {r['density_full']:.3f} / {r['density']:.3f} | {r['err_full']:.4f} / "
                     f"{r['err']:.4f} |")
    for n in strides:
        js = [r["jaccard"] for r in results if r["stride"] == n]
        lines.append(f"\nstride {n}: Jaccard {min(js):.4f} - {max(js):.4f} over {len(js)} rows; "
                     f"below 0.98 in {sum(j < 0.98 for j in js)}.")
    print("\n".join(lines))
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump({"args": vars(args), "rows": results}, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
