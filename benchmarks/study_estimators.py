"""CPU study (issue 15): what does it take for the selection to reach error <= 0.10 on planted
strengths 1-2 without more blocks?

Per planted strength and head kind: the error of paper_rule() and the defaults and where it
comes from (missed columns / slashes / spans / retrieval / sink / diffuse mass, by restoring each
category's tokens), the oracle at the defaults' density (top key blocks by EXACT block mass), and
candidate estimators of the block mass, each run through the same search (row max, the mass
guard's ladder, sinks / window / dense last rows). Everything is fp32 plain torch on sampled rows:
the error is the relative L2 of the output over eval rows drawn evenly from every query block
(disjoint from the rows the oracle and the sampled-row correction read).

    PYTHONPATH=. python benchmarks/study_estimators.py --seq-lens 4096,8192 --seeds 0,1 \
        --json benchmarks/results/study_estimators.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fp_compile import FlashPrefillConfig  # noqa: E402
from fp_compile.demo.synthetic import planted_qkv_with_info  # noqa: E402
from fp_compile.kernels.search_reference import (guarded_choice, guard_rungs,  # noqa: E402
                                                 structural_keep)
from fp_compile.kernels.vertical_slash import (add_vertical_slash,  # noqa: E402
                                               vertical_slash_flags_reference)
from fp_compile.selection import select_mask  # noqa: E402

CATEGORIES = ("sink", "column", "slash", "retrieval", "span", "diffuse")


# ----------------------------------------------------------------------------- estimators
# Each returns (B, H, S, M) fp32: the estimated log of the MEAN of exp(scale * q_r . k_s) over
# key block j (up to a per-row constant), what the search exponentiates and sums per block.

def _blocks(k, bs):
    B, Hkv, S, D = k.shape
    return k.view(B, Hkv, S // bs, bs, D)


def _rows(q, Hkv):
    return q.unflatten(1, (Hkv, q.shape[1] // Hkv))  # (B, Hkv, G, S, D)


def est_mean(q, k, scale, bs):
    """The paper's: scale * q . mean(k over the block)."""
    mu = _blocks(k, bs).mean(-2)
    return (scale * _rows(q, k.shape[1]) @ mu.unsqueeze(2).transpose(-1, -2)).flatten(1, 2)


def est_second_moment(q, k, scale, bs):
    """(a) Gaussian log-mean-exp: scale q.mu + scale^2 / 2 * q^2 . var (per-dim variance)."""
    kb = _blocks(k, bs)
    mu, var = kb.mean(-2), kb.var(-2, unbiased=False)
    qg = _rows(q, k.shape[1])
    first = qg @ mu.unsqueeze(2).transpose(-1, -2)
    second = (qg * qg) @ var.unsqueeze(2).transpose(-1, -2)
    return (scale * first + 0.5 * scale * scale * second).flatten(1, 2)


def est_sub_means(q, k, scale, bs, n_sub=4, reduce="lse"):
    """(b) n_sub sub-block means per block; block = log-mean-exp (or max) of the sub-scores."""
    B, Hkv, S, D = k.shape
    M = S // bs
    mu = k.view(B, Hkv, M * n_sub, bs // n_sub, D).mean(-2)
    sub = scale * _rows(q, Hkv) @ mu.unsqueeze(2).transpose(-1, -2)
    sub = sub.view(*sub.shape[:-1], M, n_sub)
    if reduce == "max":
        return sub.amax(-1).flatten(1, 2)
    return (torch.logsumexp(sub, -1) - math.log(n_sub)).flatten(1, 2)


def est_outliers(q, k, scale, bs, n_out=1):
    """(e) the mean of the block's other keys plus its n_out keys farthest from the block mean
    as separate tokens: log((bs - n) / bs * exp(q.mu_rest) + 1 / bs * sum exp(q.k_out))."""
    kb = _blocks(k, bs)
    mu = kb.mean(-2, keepdim=True)
    far = (kb - mu).norm(dim=-1).topk(n_out, dim=-1).indices  # (B, Hkv, M, n_out)
    out = kb.gather(-2, far[..., None].expand(*far.shape, kb.shape[-1]))
    rest = (kb.sum(-2) - out.sum(-2)) / (bs - n_out)
    qg = _rows(q, k.shape[1])
    l_rest = scale * qg @ rest.unsqueeze(2).transpose(-1, -2) + math.log((bs - n_out) / bs)
    B, Hkv, M = far.shape[:3]
    l_out = scale * qg @ out.reshape(B, Hkv, 1, M * n_out, -1).transpose(-1, -2)
    l_out = l_out.view(*l_out.shape[:-1], M, n_out) - math.log(bs)
    return torch.logsumexp(torch.cat([l_rest[..., None], l_out], -1), -1).flatten(1, 2)


def est_quest(q, k, scale, bs):
    """(e) Quest-style: the mean plus one pseudo-token at the per-channel upper bound
    sum_d max(q_d kmax_d, q_d kmin_d) of the block's largest logit."""
    kb = _blocks(k, bs)
    mu, kmax, kmin = kb.mean(-2), kb.amax(-2), kb.amin(-2)
    qg = _rows(q, k.shape[1]).unsqueeze(-2)  # (B, Hkv, G, S, 1, D)
    bound = torch.maximum(qg * kmax[:, :, None, None], qg * kmin[:, :, None, None]).sum(-1)
    l_mean = scale * _rows(q, k.shape[1]) @ mu.unsqueeze(2).transpose(-1, -2)
    l_mean = l_mean + math.log((bs - 1) / bs)
    return torch.logaddexp(l_mean, scale * bound - math.log(bs)).flatten(1, 2)


# ------------------------------------------------------------------------------ the search

def block_scores(logits, M, bs):
    """Per query block the sum over its rows of exp(logit - block max) over key blocks j < i
    (B, H, M, M): the search's scores, proportional to the estimated block masses."""
    B, H, S, _ = logits.shape
    i = torch.arange(M)[:, None]
    j = torch.arange(M)[None, :]
    scored = j < i
    lg = logits.view(B, H, M, bs, M).masked_fill(~scored[None, None, :, None, :], -math.inf)
    m = lg.amax(dim=(-2, -1), keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    return torch.exp(lg - m).sum(-2)


def search(logits, cfg, M, bs, alpha=None, floor=None):
    """The reference search on estimated logits (B, H, S, M): block scores, the mass guard's
    ladder (``floor``: the config's mass_floor when None), structural blocks."""
    alpha = cfg.alpha if alpha is None else alpha
    floor = cfg.mass_floor if floor is None else floor
    scores = block_scores(logits, M, bs)
    i = torch.arange(M)[:, None]
    scored = torch.arange(M)[None, :] < i
    structural = structural_keep(M, 0, M, cfg.sink_blocks, cfg.window_blocks,
                                 cfg.last_dense_blocks, logits.device)
    chosen, _ = guarded_choice(scores, scored, structural, alpha, floor)
    return chosen | structural


def estimated_mask(est, q, k, scale, cfg, **kw):
    M = k.shape[2] // cfg.block_size
    return search(est(q, k, scale, cfg.block_size, **kw), cfg, M, cfg.block_size)


# ------------------------------------------------------------------------ exact statistics

def stratified_rows(S, bs, per_block, offset):
    """per_block rows of every query block, spread over it; offset shifts them (disjoint sets)."""
    step = bs // per_block
    within = (torch.arange(per_block) * step + offset % step)
    return (torch.arange(S // bs)[:, None] * bs + within[None, :]).flatten()


def exact_rows(q, k, v, scale, rows, bs, masks=None, cats=None):
    """Exact causal attention of ``rows``, per head: block masses (H, R, M) and block
    numerators (H, R, M, D) (B = 1); with ``masks`` {name: (H, M, M) bool} and ``cats``
    (per kv head: (R, S) int8 category labels fn), the squared error per head of each mask and of
    each mask with one category's tokens restored: {name: {cat: (H,) tensor}}."""
    _, H, S, D = q.shape
    Hkv = k.shape[1]
    G, M = H // Hkv, S // bs
    mass = torch.empty(H, rows.numel(), M)
    numer = torch.empty(H, rows.numel(), M, D)
    causal = torch.arange(S)[None, :] <= rows[:, None]
    ablate = {n: {c: torch.zeros(H) for c in ("none",) + CATEGORIES} for n in (masks or {})}
    for h in range(H):
        kv = h // G
        logits = (scale * q[0, h, rows] @ k[0, kv].T).masked_fill(~causal, -math.inf)
        p = torch.softmax(logits, dim=-1)
        mass[h] = p.view(-1, M, bs).sum(-1)
        numer[h] = torch.einsum("rmb,mbd->rmd", p.view(-1, M, bs), v[0, kv].view(M, bs, D))
        if not masks:
            continue
        dense_o = p @ v[0, kv]
        label = cats(kv)
        for name, mask in masks.items():
            inside = mask[h][rows // bs].repeat_interleave(bs, dim=-1)
            for c in ("none",) + CATEGORIES:
                keep = inside if c == "none" else inside | (label == CATEGORIES.index(c))
                pk = p * keep
                o = (pk @ v[0, kv]) / pk.sum(-1, keepdim=True)
                ablate[name][c][h] = ((o - dense_o) ** 2).sum()
    return mass, numer, ablate


def category_labels(info, S, rows, kv, slash_width=8):
    """(R, S) int8: index into CATEGORIES of each (row, key): the first that applies."""
    lab = torch.full((rows.numel(), S), CATEGORIES.index("diffuse"), dtype=torch.int8)
    keys = torch.arange(S)
    span = torch.zeros(S, dtype=torch.bool)
    for a, b in info["spans"][1:]:
        span[a:b] = True
    lab[:, span] = CATEGORIES.index("span")
    ret = torch.zeros(S, dtype=torch.bool)
    for a, b in info["retrieval"]:
        ret[a:b] = True
    lab[:, ret] = CATEGORIES.index("retrieval")
    for o in info["offsets"]:
        on = ((rows[:, None] - keys[None, :]) - o).abs() <= slash_width
        lab[on] = CATEGORIES.index("slash")
    cols = torch.zeros(S, dtype=torch.bool)
    cols[info["columns"][0, kv]] = True
    lab[:, cols] = CATEGORIES.index("column")
    lab[:, :128] = CATEGORIES.index("sink")
    return lab


def evaluate(mask, mass, numer, rows, bs, dense_o):
    """(per-head squared error (H,), per-head mass recall (H,)) of mask (H, M, M) on the rows."""
    inside = mask[:, rows // bs].float()  # (H, R, M)
    kept = (inside * mass).sum(-1)
    o = (inside[..., None] * numer).sum(-2) / kept[..., None]
    return ((o - dense_o) ** 2).sum((-2, -1)), kept.mean(-1)


# ------------------------------------------------------------------------------- the oracle

def oracle_mask(base, block_mass, cfg, M, factor=1.0):
    """Per (head, query block): the structural blocks plus the top key blocks by exact block
    mass (block_mass (H, M, M)), as many as ``base`` keeps beyond the structure times factor."""
    structural = structural_keep(M, 0, M, cfg.sink_blocks, cfg.window_blocks,
                                 cfg.last_dense_blocks, base.device)
    causal = torch.ones(M, M, dtype=torch.bool).tril()
    extra = (base & ~structural).sum(-1)  # (H, M)
    want = (extra.float() * factor).round().long()
    free = causal & ~structural
    score = block_mass.masked_fill(~free, -1.0)
    order = score.argsort(-1, descending=True).argsort(-1)  # rank of each block
    top = (order < want[..., None]) & free
    return top | structural


def global_oracle(base, block_mass, cfg, M, factor=1.0):
    """Structure plus the top (head, query block, key block) pairs by exact mass SHARE of
    their row over the whole call, as many pairs as ``base`` keeps beyond the structure times
    factor: the best kept set at that density."""
    structural = structural_keep(M, 0, M, cfg.sink_blocks, cfg.window_blocks,
                                 cfg.last_dense_blocks, base.device)
    causal = torch.ones(M, M, dtype=torch.bool).tril()
    free = causal & ~structural
    want = int(round(float((base & ~structural).sum()) * factor))
    share = (block_mass / block_mass.sum(-1, keepdim=True)).masked_fill(~free, -1.0)
    flat = share.flatten()
    top = torch.zeros_like(flat, dtype=torch.bool)
    top[flat.topk(min(want, int(free.sum()) * share.shape[0])).indices] = True
    return (top.view_as(share) & free) | structural


def coverage_oracle(block_mass, cfg, M, coverage):
    """Per (head, query block): structure plus the fewest blocks whose exact mass reaches
    ``coverage`` of the row (blocks by decreasing exact mass)."""
    structural = structural_keep(M, 0, M, cfg.sink_blocks, cfg.window_blocks,
                                 cfg.last_dense_blocks, block_mass.device)
    causal = torch.ones(M, M, dtype=torch.bool).tril()
    bm = block_mass / block_mass.sum(-1, keepdim=True)
    base = (bm * structural).sum(-1, keepdim=True)
    free = (causal & ~structural)
    s = bm.masked_fill(~free, 0.0)
    vals, idx = s.sort(-1, descending=True)
    before = base + vals.cumsum(-1) - vals  # mass kept before adding this block
    take = (before < coverage) & (vals > 0)
    top = torch.zeros_like(structural.expand_as(s)).scatter(-1, idx, take)
    return top | structural


# ------------------------------------------------------------ (f) the spread median probe

def median_probe_scores(q, k, scale, bs, n_rows=64):
    """(f) Exact logits of n_rows query rows spread evenly over the second half of the prompt,
    each row's logits minus the row's mean logit (over its visible keys); per key column s and
    per diagonal o (key r - o), the MEDIAN over the rows of that excess: (column, diagonal),
    each (B, H, S), -inf where fewer than half the rows see it. A median is robust to what
    drowns a mean over one block of rows: the per-token noise of a line (std 2-4 nats on the
    planted slash heads, so its mass comes from a few rows) and one row's spikes elsewhere."""
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    rows = torch.linspace(S // 2, S - 1, n_rows).long()
    logits = scale * (q[:, :, rows].unflatten(1, (Hkv, H // Hkv))
                      @ k.unsqueeze(2).transpose(-1, -2)).flatten(1, 2)  # (B, H, P, S)
    keys = torch.arange(S)
    visible = keys[None, :] <= rows[:, None]
    mean = (logits * visible).sum(-1, keepdim=True) / visible.sum(-1, keepdim=True)
    x = (logits - mean).masked_fill(~visible, math.nan)
    column = x.nanmedian(dim=-2).values
    index = (rows[:, None] - keys[None, :])  # key r - o at offset o
    diag = x.gather(-1, index.clamp_min(0).expand(B, H, -1, -1)).masked_fill(index < 0, math.nan)
    diagonal = diag.nanmedian(dim=-2).values
    seen = (index >= 0).float().mean(0)
    diagonal = diagonal.masked_fill(seen < 0.5, -math.inf)
    column = column.masked_fill(visible.float().mean(0) < 0.5, -math.inf)
    return column.nan_to_num(-math.inf), diagonal.nan_to_num(-math.inf)


def robust_z(x):
    """(x - median) / MAD per (B, H) row over its finite entries (-inf elsewhere)."""
    finite = x.isfinite()
    y = x.masked_fill(~finite, math.nan)
    med = y.nanmedian(-1, keepdim=True).values
    mad = (y - med).abs().nanmedian(-1, keepdim=True).values.clamp_min(1e-6)
    return ((y - med) / mad).nan_to_num(-math.inf)


def median_probe_flags(q, k, scale, bs, kappa=8.0, n_rows=64, columns=True):
    """Block flags of the columns / diagonals whose median excess is an outlier of its head:
    at least ``kappa`` median absolute deviations above the head's median (scale-free, so a
    stronger head does not flag its noise)."""
    from fp_compile.kernels.vertical_slash import flags_from_scores
    column, diagonal = median_probe_scores(q, k, scale, bs, n_rows)
    column = robust_z(column) if columns else torch.full_like(column, -math.inf)
    return flags_from_scores(column, robust_z(diagonal), bs, kappa)


# ------------------------------------------------------------------ sampled-row correction

def sampled_correction(rung_masks, probe_mass, probe_rows, bs, target):
    """(c) per head, the first rung of the guard's ladder (masks from alpha, alpha/4, ..., 0)
    whose exact recall on the probe rows (exact masses probe_mass (H, P, M)) reaches target."""
    chosen = rung_masks[-1].clone()
    settled = torch.zeros(rung_masks[0].shape[0], dtype=torch.bool)
    rung = torch.full_like(settled, len(rung_masks) - 1, dtype=torch.long)
    for c, mask in enumerate(rung_masks):
        recall = (mask[:, probe_rows // bs].float() * probe_mass).sum(-1).mean(-1)
        take = ~settled & (recall >= target)
        chosen[take] = mask[take]
        rung[take] = c
        settled |= take
    return chosen, rung


# ------------------------------------------------------------------------------ the driver

def dense_fallback(mask, Hkv, dense_above):
    """The dense fallback: kv groups whose kept density is above dense_above keep everything."""
    H, M, _ = mask.shape
    causal = torch.ones(M, M, dtype=torch.bool).tril()
    dens = mask.view(Hkv, H // Hkv, M, M).float().sum((-3, -2, -1)) / (H // Hkv * causal.sum())
    full = (dens > dense_above).repeat_interleave(H // Hkv)
    return torch.where(full[:, None, None], causal, mask), bool(full.any())


def run_case(S, bs, seed, strength, args):
    H, Hkv, D = args.heads, args.kv_heads, args.head_dim
    q, k, v, info = planted_qkv_with_info(1, H, Hkv, S, D, seed=seed, strength=strength)
    scale = D ** -0.5
    M = S // bs
    kinds = info["kinds"]
    cfg = FlashPrefillConfig(block_size=bs, min_seq_len=0)
    paper = FlashPrefillConfig.paper_rule(block_size=bs, min_seq_len=0)
    t0 = time.time()
    masks = {"paper": select_mask(q, k, scale, paper)[0],
             "default": select_mask(q, k, scale, cfg)[0]}
    mine = estimated_mask(est_mean, q, k, scale, cfg)[0]
    assert torch.equal(mine, masks["default"]), "study search != reference search"
    ests = {"a_second_moment": (est_second_moment, {}),
            "b_sub2_lse": (est_sub_means, {"n_sub": 2}),
            "b_sub4_lse": (est_sub_means, {"n_sub": 4}),
            "b_sub4_max": (est_sub_means, {"n_sub": 4, "reduce": "max"}),
            "e_outlier4": (est_outliers, {"n_out": 4}),
            "e_quest": (est_quest, {})}
    per = min(args.rows_per_block, bs // 4)
    or_rows = stratified_rows(S, bs, per, 1)
    or_mass = exact_rows(q, k, v, scale, or_rows, bs)[0]
    block_mass = or_mass.view(H, M, per, M).sum(-2)
    ests["mean"] = (est_mean, {})
    for name, (fn, kw) in ests.items():
        logits = fn(q, k, scale, bs, **kw)
        if name != "mean":
            masks[name] = search(logits, cfg, M, bs)[0]
        for floor in (args.floors if name in ("mean", "a_second_moment", "b_sub4_lse") else ()):
            masks[f"{name}_floor{floor:g}"] = search(logits, cfg, M, bs, floor=floor)[0]
        est_mass = block_scores(logits, M, bs)[0]
        masks[f"topk_{name}"] = oracle_mask(masks["default"], est_mass, cfg, M)
        if name in args.global_estimators:
            # The call-wide allocation of the oracle, on ESTIMATED shares: does the estimate
            # carry what the call-wide oracle gains over the per-row rule?
            for f in args.global_factors:
                masks[f"global_{name}_x{f:g}"] = global_oracle(masks["default"], est_mass, cfg,
                                                               M, f)
    flags = vertical_slash_flags_reference(q, k, scale, bs, cfg.vs_threshold)
    masks["d_vs_guards"] = add_vertical_slash(masks["default"][None], *flags)[0]
    for t in args.vs_thresholds:
        f = vertical_slash_flags_reference(q, k, scale, bs, t)
        masks[f"d_vs{t:g}"] = add_vertical_slash(masks["default"][None], *f)[0]
    for t in args.vs_thresholds:
        for n in args.vs_rows:
            # (d') the probe cut to the prompt's last n rows: n / bs of the full probe's dots
            f = vertical_slash_flags_reference(q, k, scale, bs, t, n)
            masks[f"d_vs{t:g}_r{n}"] = add_vertical_slash(masks["default"][None], *f)[0]
    for kappa in args.kappas:
        f = median_probe_flags(q, k, scale, bs, kappa)
        masks[f"f_median{kappa:g}"] = add_vertical_slash(masks["default"][None], *f)[0]
        f = median_probe_flags(q, k, scale, bs, kappa, columns=False)
        masks[f"f_median{kappa:g}_diag"] = add_vertical_slash(masks["default"][None], *f)[0]
    # exact statistics: eval rows, oracle rows, probe rows (disjoint)
    ev_rows = stratified_rows(S, bs, per, 0)
    mass, numer, _ = exact_rows(q, k, v, scale, ev_rows, bs)
    dense_o = numer.sum(-2)
    pr_rows = stratified_rows(S, bs, 1, 2)[:: max(1, M // 64)]
    pr_mass = exact_rows(q, k, v, scale, pr_rows, bs)[0]
    logits = est_mean(q, k, scale, bs)
    rungs = [search(logits, cfg, M, bs, alpha=a)[0] for a in guard_rungs(cfg.alpha)]
    rungs_o4 = [search(est_outliers(q, k, scale, bs, n_out=4), cfg, M, bs, alpha=a)[0]
                for a in guard_rungs(cfg.alpha)]
    for target in args.targets:
        masks[f"c_sampled{target:g}"] = sampled_correction(rungs, pr_mass, pr_rows, bs, target)[0]
        masks[f"c_sampled{target:g}_outlier4"] = sampled_correction(
            rungs_o4, pr_mass, pr_rows, bs, target)[0]
    f = median_probe_flags(q, k, scale, bs, args.kappas[len(args.kappas) // 2])
    for target in args.targets:
        masks[f"f_median_c_sampled{target:g}"] = add_vertical_slash(
            masks[f"c_sampled{target:g}"][None], *f)[0]
    for f in args.oracle_factors:
        masks[f"oracle_x{f:g}"] = oracle_mask(masks["default"], block_mass, cfg, M, f)
    for f in args.oracle_factors:
        masks[f"oracle_global_x{f:g}"] = global_oracle(masks["default"], block_mass, cfg, M, f)
    for c in args.coverages:
        masks[f"oracle_cov{c:g}"] = coverage_oracle(block_mass, cfg, M, c)
    # category ablation on a few rows
    ab_rows = stratified_rows(S, bs, max(1, per // 4), 3)
    cats = {kv: category_labels(info, S, ab_rows, kv) for kv in range(Hkv)}
    _, ab_numer, ablate = exact_rows(q, k, v, scale, ab_rows, bs,
                                     {"paper": masks["paper"], "default": masks["default"]},
                                     cats.__getitem__)
    ab_dense = (ab_numer.sum(-2) ** 2).sum((-2, -1))
    causal = M * (M + 1) / 2
    dnorm = (dense_o ** 2).sum((-2, -1))
    out = []
    for name, mask in masks.items():
        mask, went_dense = dense_fallback(mask, Hkv, cfg.dense_above)
        sq, rec = evaluate(mask, mass, numer, ev_rows, bs, dense_o)
        row = {"S": S, "bs": bs, "seed": seed, "strength": strength, "method": name,
               "err": float((sq.sum() / dnorm.sum()).sqrt()),
               "density": float(mask.float().sum() / (H * causal)),
               "recall": float(rec.mean()), "went_dense": went_dense}
        for kind in sorted(set(kinds)):
            hs = [h for h in range(H) if kinds[h] == kind]
            row[f"err_{kind}"] = float((sq[hs].sum() / dnorm[hs].sum()).sqrt())
            row[f"recall_{kind}"] = float(rec[hs].mean())
            row[f"density_{kind}"] = float(mask[hs].float().sum() / (len(hs) * causal))
        if name in ablate:
            for c, e in ablate[name].items():
                row[f"ab_{c}"] = float((e.sum() / ab_dense.sum()).sqrt())
                for kind in sorted(set(kinds)):
                    hs = [h for h in range(H) if kinds[h] == kind]
                    row[f"ab_{c}_{kind}"] = float((e[hs].sum() / ab_dense[hs].sum()).sqrt())
        out.append(row)
    print(f"S={S} bs={bs} seed={seed} strength={strength:g}: {time.time() - t0:.1f}s "
          + " ".join(f"{r['method']}={r['err']:.3f}/{r['density']:.3f}" for r in out[:4]),
          flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", default="4096,8192")
    p.add_argument("--block-sizes", default="128")
    p.add_argument("--strengths", default="0.75,1,1.5,2")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--rows-per-block", type=int, default=16)
    p.add_argument("--targets", default="0.9,0.95")
    p.add_argument("--oracle-factors", default="1,1.25,1.5,2")
    p.add_argument("--coverages", default="0.9,0.95,0.98")
    p.add_argument("--vs-thresholds", default="0.005")
    p.add_argument("--kappas", default="6,8,12")
    p.add_argument("--floors", default="0.9,0.95")
    p.add_argument("--global-estimators", default="mean,b_sub4_lse",
                   help="estimators also run through the call-wide allocation (global_oracle)")
    p.add_argument("--global-factors", default="1,1.25")
    p.add_argument("--vs-rows", default="128,32",
                   help="probe rows of the vertical/slash variants d_vs<t>_r<n>")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="")
    p.add_argument("--report", default="", help="only write this markdown from --json")
    args = p.parse_args(argv)
    if args.report:
        report(args.json, args.report)
        return
    torch.set_num_threads(args.threads)
    for name in ("targets", "oracle_factors", "coverages", "floors", "vs_thresholds", "kappas",
                 "global_factors"):
        setattr(args, name, [float(x) for x in getattr(args, name).split(",") if x])
    args.global_estimators = [x for x in args.global_estimators.split(",") if x]
    args.vs_rows = [int(x) for x in args.vs_rows.split(",") if x]
    rows = []
    for S in [int(x) for x in args.seq_lens.split(",")]:
        for bs in [int(x) for x in args.block_sizes.split(",")]:
            for strength in [float(x) for x in args.strengths.split(",")]:
                for seed in [int(x) for x in args.seeds.split(",")]:
                    with torch.no_grad():
                        rows.extend(run_case(S, bs, seed, strength, args))
                    if args.json:
                        with open(args.json, "w") as f:
                            json.dump({"argv": sys.argv[1:], "rows": rows}, f, indent=0)


# ------------------------------------------------------------------------------ the report

def _mean(rows, key):
    vals = [r[key] for r in rows if key in r]
    return sum(vals) / len(vals) if vals else float("nan")


def report(path_json, path_md, title="Block-mass estimators vs the oracle (CPU study)"):
    """Markdown tables (means over seeds) from the study's JSON."""
    rows = json.load(open(path_json))["rows"]
    groups = {}
    for r in rows:
        groups.setdefault((r["S"], r["bs"], r["strength"], r["method"]), []).append(r)
    cases = sorted({k[:3] for k in groups})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    kinds = sorted(k[4:] for k in rows[0] if k.startswith("err_"))
    seeds = sorted({r["seed"] for r in rows})
    out = [f"# {title}", "", f"Means over seeds {seeds}; B 1, H 8, Hkv 2, fp32, "
           f"`planted_qkv`; error = relative L2 of the output vs dense attention on "
           f"stratified eval rows. Raw: `{os.path.basename(path_json)}`.", ""]
    out += ["## 1. Error by head kind and what carries it (default config)", "",
            "| S | block | strength | paper err | default err | density | "
            + " | ".join(f"err {k}" for k in kinds) + " | restored: "
            + " | ".join(CATEGORIES) + " |", "|" + "---|" * (6 + len(kinds) + len(CATEGORIES))]
    for S, bs, st in cases:
        d, p = groups[(S, bs, st, "default")], groups[(S, bs, st, "paper")]
        out.append(f"| {S} | {bs} | {st:g} | {_mean(p, 'err'):.3f} | {_mean(d, 'err'):.3f} | "
                   f"{_mean(d, 'density'):.3f} | "
                   + " | ".join(f"{_mean(d, 'err_' + k):.3f}" for k in kinds) + " | "
                   + " | ".join(f"{_mean(d, 'ab_' + c):.3f}" for c in CATEGORIES) + " |")
    out += ["", "Restored: the default's error (on the ablation rows) when that category's "
            "tokens are added to the kept set (sink = the first 128 keys; slash = within 8 "
            "tokens of a planted diagonal).", ""]
    for title_, names in (("## 2. Oracles (exact block masses)", [
            m for m in methods if m.startswith("oracle") or m == "default"]),
            ("## 3. Candidates", [m for m in methods if not m.startswith("oracle")])):
        out += [title_, "", "error / density / mass recall; Δd: density minus the default's "
                "(points) on the same input", ""]
        header = "| method | " + " | ".join(f"S {S} b{bs} s{st:g}" for S, bs, st in cases)
        out += [header + " |", "|---" * (len(cases) + 1) + "|"]
        for m in names:
            cells = []
            for S, bs, st in cases:
                g = groups.get((S, bs, st, m))
                if not g:
                    cells.append("")
                    continue
                dd = 100 * (_mean(g, "density") - _mean(groups[(S, bs, st, "default")],
                                                        "density"))
                mark = "**" if _mean(g, "err") <= 0.10 else ""
                cells.append(f"{mark}{_mean(g, 'err'):.3f}{mark} / {_mean(g, 'density'):.3f} "
                             f"/ {_mean(g, 'recall'):.3f} (Δd {dd:+.1f})")
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")
    with open(path_md, "w") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
