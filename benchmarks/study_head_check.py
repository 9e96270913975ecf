"""CPU study (issue 15): can a per-head check bring planted strengths 1-2 to error <= 0.10?

For ``planted_qkv`` at each length, strength and seed (B 1, H 8, Hkv 2, D 128, bf16-rounded
inputs, fp32 plain torch, blocks of 128), on eval rows drawn from every query block from the
9th on (2 per block), the relative L2 error of the output vs dense attention and the density of:

* ``default``: the default config (mass guard, vertical/slash detector on the last 16 rows);
* ``check<t>``: the issue's suggestion, the exact probe used to check the estimate per head.
  The probe rows (the prompt's last 16, the detector's) get their exact causal softmax; per
  head, the rule's kept set of their query block (the last, as if it were not a dense row) is
  taken at each rung of the mass guard's ladder (alpha, alpha/4, alpha/16, alpha/64, every
  causal block) and the head runs at the first rung whose EXACT kept share of the probe rows
  reaches t (every query block of the head, through the default selection at that alpha);
  ``check<t>_nolines``: the same without the detector's blocks in the probe rows' kept set
  (the detector finds them from these same rows, so with them the check grades its own rows);
* ``slash_dense``: an oracle that knows which heads are slash heads (``info["kinds"]``) and
  runs them dense, the rest as the default;
* ``mass_oracle``: the default selection with the exact dropped mass of each row put back as
  one pseudo-token carrying the dropped keys' mean value (a bound on any mass correction, e.g.
  a better-estimated ``mean_correction``).

Per head kind it also reports the slash heads' median top-1 key share (how spiky the rows are).

    PYTHONPATH=. python benchmarks/study_head_check.py --seq-lens 16384,32768 \
        --strengths 1,1.5,2 --seeds 0,1 --json benchmarks/results/study_head_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fp_compile import FlashPrefillConfig  # noqa: E402
from fp_compile.demo.synthetic import planted_qkv_with_info  # noqa: E402
from fp_compile.kernels.block_means import key_block_means  # noqa: E402
from fp_compile.kernels.search_reference import (_scored, block_scores_reference,  # noqa: E402
                                                 guard_rungs, guarded_choice, span_blocks,
                                                 structural_keep)
from fp_compile.kernels.vertical_slash import (add_vertical_slash,  # noqa: E402
                                               vertical_slash_flags_reference)
from fp_compile.selection import select_mask  # noqa: E402

BLOCK, H, HKV, D = 128, 8, 2, 128


def softmax_rows(q, k, h, rows):
    """Exact causal softmax (len(rows), S) of query head h."""
    S = k.shape[2]
    logits = (D ** -0.5) * q[0, h, rows] @ k[0, h // (H // HKV)].T
    logits = logits.masked_fill(torch.arange(S)[None] > rows[:, None], float("-inf"))
    return torch.softmax(logits, -1)


def head_rows(q, k, v, h, rows):
    """Exact causal softmax (len(rows), S) of head h and its output (len(rows), D)."""
    p = softmax_rows(q, k, h, rows)
    return p, p @ v[0, h // (H // HKV)]


def errors(q, k, v, keep, rows, mass_oracle=False):
    """(relative L2 over all heads, per head list) of the block-sparse output on ``rows``."""
    S = k.shape[2]
    cols = torch.arange(S)
    num = den = 0.0
    per = []
    for h in range(H):
        p, o = head_rows(q, k, v, h, rows)
        inside = keep[0, h][rows // BLOCK][:, cols // BLOCK]
        kept = p * inside
        share = kept.sum(-1, keepdim=True)
        out = kept @ v[0, h // (H // HKV)] / share
        if mass_oracle:
            dropped = ~inside & (cols[None] <= rows[:, None])
            vmean = (dropped.float() @ v[0, h // (H // HKV)]
                     / dropped.sum(-1, keepdim=True).clamp_min(1))
            out = share * out + (1 - share) * vmean
        e, n = float((out - o).pow(2).sum()), float(o.pow(2).sum())
        num, den = num + e, den + n
        per.append((e / n) ** 0.5)
    return (num / den) ** 0.5, per


def probe_shares(q, k, cfg: FlashPrefillConfig, n_rows: int = 16, lines: bool = True
                 ) -> torch.Tensor:
    """(rungs, H): the exact share of the probe rows' attention the rule keeps at each rung
    (``lines``: with the detector's blocks, found from these same rows)."""
    S = k.shape[2]
    M = S // BLOCK
    scale = D ** -0.5
    rows = torch.arange(S - n_rows, S)
    exact = torch.stack([softmax_rows(q, k, h, rows).mean(0).view(M, BLOCK).sum(-1)
                         for h in range(H)])
    kmean = key_block_means(k, BLOCK).to(torch.bfloat16).float()
    scores = block_scores_reference(q, kmean, scale, BLOCK, M - 1, M)
    blocks = span_blocks(None, 1, S, M, BLOCK, M - 1, M, q.device)
    structural = structural_keep(M, M - 1, M, cfg.sink_blocks, cfg.window_blocks, 0,
                                 q.device)[None]
    flags = vertical_slash_flags_reference(q, k, scale, BLOCK, cfg.vs_threshold, cfg.vs_rows)
    shares = []
    for t in guard_rungs(cfg.alpha):
        chosen, _ = guarded_choice(scores, _scored(blocks, M - 1, M)[:, None], structural, t,
                                   cfg.mass_floor)
        chosen = chosen | structural
        if lines:
            chosen = add_vertical_slash(chosen, *flags)
        shares.append((exact * chosen[0, :, 0].float()).sum(-1))
    return torch.stack(shares)


def cell(S: int, strength: float, seed: int, targets) -> dict:
    q, k, v, info = planted_qkv_with_info(1, H, HKV, S, D, seed=seed, strength=strength)
    q, k, v = (x.to(torch.bfloat16).float() for x in (q, k, v))
    M = S // BLOCK
    cfg = FlashPrefillConfig()
    g = torch.Generator().manual_seed(seed + 1)
    rows = torch.cat([b * BLOCK + torch.randperm(BLOCK, generator=g)[:2]
                      for b in range(8, M)]).sort().values
    causal = torch.tril(torch.ones(M, M, dtype=torch.bool))

    def density(keep):
        return float((keep & causal).sum() / (causal.sum() * H))

    rungs = [select_mask(q, k, D ** -0.5, cfg.replace(alpha=t)) for t in guard_rungs(cfg.alpha)]
    out = {"S": S, "strength": strength, "seed": seed, "kinds": info["kinds"]}
    err, per = errors(q, k, v, rungs[0], rows)
    out["default"] = {"error": err, "density": density(rungs[0]), "per_head": per}
    for lines, tag in ((True, ""), (False, "_nolines")):
        shares = probe_shares(q, k, cfg, lines=lines)
        out["probe_shares" + tag] = shares.tolist()
        for t in targets:
            chosen = [int((shares[:, h] >= t).nonzero().min()) for h in range(H)]
            keep = torch.stack([rungs[c][0, h] for h, c in enumerate(chosen)])[None]
            err, per = errors(q, k, v, keep, rows)
            out[f"check{t:g}{tag}"] = {"error": err, "density": density(keep), "per_head": per,
                                       "rungs": chosen}
    keep = rungs[0].clone()
    for h, kind in enumerate(info["kinds"]):
        if kind == "slash":
            keep[0, h] = causal
    err, per = errors(q, k, v, keep, rows)
    out["slash_dense"] = {"error": err, "density": density(keep), "per_head": per}
    err, per = errors(q, k, v, rungs[0], rows, mass_oracle=True)
    out["mass_oracle"] = {"error": err, "density": density(rungs[0]), "per_head": per}
    top1 = [float(softmax_rows(q, k, h, rows).max(-1).values.median()) for h in range(H)]
    out["top1_median"] = top1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-lens", default="16384,32768")
    ap.add_argument("--strengths", default="1,1.5,2")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--targets", default="0.9,0.95")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    targets = [float(t) for t in args.targets.split(",")]
    results = []
    for S in (int(s) for s in args.seq_lens.split(",")):
        for st in (float(s) for s in args.strengths.split(",")):
            for seed in (int(s) for s in args.seeds.split(",")):
                t0 = time.time()
                r = cell(S, st, seed, targets)
                results.append(r)
                line = " | ".join(f"{name} {r[name]['error']:.3f} / {r[name]['density']:.3f}"
                                  for name in ["default"]
                                  + [f"check{t:g}{tag}" for tag in ("", "_nolines")
                                     for t in targets]
                                  + ["slash_dense", "mass_oracle"])
                print(f"S {S} strength {st:g} seed {seed}: {line} ({time.time() - t0:.0f} s)",
                      flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
