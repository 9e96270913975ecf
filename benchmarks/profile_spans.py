"""Where a padded batch's time goes (issue 11): stage by stage, batched and one by one.

For the batch of ``bench_spans.py`` (left padded, random values in the padding) and for each
prompt alone, the GPU time (CUDA events, calls queued, median) of the span path's stages:
block means + pattern search, the on-device dense decision, block-sparse attention; the kept
density and how many kv groups the dense fallback flagged. Each prompt alone also runs through
the span path with an all-ones key mask, to separate the span path's own cost from padding's.
Correctness in the same run: the staged output equals the op's.

    python benchmarks/profile_spans.py --out profile_spans.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fp_compile import FlashPrefillConfig, dispatch, flash_prefill, spans  # noqa: E402
from fp_compile.demo.bench import cuda_time, rel_err  # noqa: E402
from fp_compile.demo.synthetic import planted_qkv  # noqa: E402
from fp_compile.kernels import utils as ku  # noqa: E402


def stages(q, k, v, cfg, key_mask, reps) -> dict:
    scale = q.shape[-1] ** -0.5
    span = spans.span_of(q, k, key_mask)
    sel = spans.select(q, k, scale, cfg, span)
    sel2, flags = spans.dense_where_flagged(sel, span, q.shape[2], k.shape[2], k.shape[1], cfg)
    out = spans.attend(q, k, v, scale, cfg, span, sel2)
    whole = flash_prefill(q, k, v, enable_gqa=True, config=cfg, key_mask=key_mask)
    cand = spans.candidate_blocks(span, q.shape[2], k.shape[2], cfg.block_size)
    H = q.shape[1]
    return {
        "staged_vs_op": rel_err(out, whole),
        "density_search": (sel.num.sum((1, 2)).float() / (cand.sum(-1).float() * H)).tolist(),
        "density_attended": (sel2.num.sum((1, 2)).float() / (cand.sum(-1).float() * H)).tolist(),
        "flagged_groups": flags.sum(-1).tolist(),
        "span_of_ms": cuda_time(lambda: spans.span_of(q, k, key_mask), reps)[0],
        "select_ms": cuda_time(lambda: spans.select(q, k, scale, cfg, span), reps)[0],
        "dense_decision_ms": cuda_time(lambda: spans.dense_where_flagged(
            sel, span, q.shape[2], k.shape[2], k.shape[1], cfg), reps)[0],
        "attend_ms": cuda_time(lambda: spans.attend(q, k, v, scale, cfg, span, sel2), reps)[0],
        "attend_search_sel_ms": cuda_time(lambda: spans.attend(q, k, v, scale, cfg, span, sel),
                                          reps)[0],
        "op_ms": cuda_time(lambda: flash_prefill(q, k, v, enable_gqa=True, config=cfg,
                                                 key_mask=key_mask), reps)[0],
    }


def search_parts(q, k, cfg, reps) -> dict:
    """The last prompt's key means and pattern search, with and without a (full) span."""
    from fp_compile.kernels.block_means import block_means
    from fp_compile.kernels.pattern_search import pattern_search

    bs, scale = cfg.block_size, q.shape[-1] ** -0.5
    span = spans.span_of(q, k, torch.ones(1, k.shape[2], dtype=torch.int64, device="cuda"))
    res = {}
    for name, sp in (("plain", None), ("span", span)):
        km = block_means(k, bs, out_dtype=q.dtype, span=sp)
        res[f"block_means_{name}_ms"] = cuda_time(
            lambda: block_means(k, bs, out_dtype=q.dtype, span=sp), reps)[0]
        res[f"search_{name}_ms"] = cuda_time(lambda: pattern_search(
            q, k, scale, bs, cfg.alpha, cfg.sink_blocks, cfg.window_blocks,
            cfg.last_dense_blocks, kmean=km, mass_floor=cfg.mass_floor, span=sp), reps)[0]
    return res


def registers() -> dict:
    """Registers and spills of every compiled variant of the attention and search kernels."""
    from fp_compile.kernels import block_sparse_attention as bsa
    from fp_compile.kernels import pattern_search as ps

    out = {}
    for name, fn in (("attention", bsa._bsa_fwd_kernel), ("search", ps._pattern_search_kernel)):
        for caches in getattr(fn, "device_caches", {}).values():
            for key, kernel in caches[0].items():
                try:
                    kernel._init_handles()
                    out[f"{name} {len(out)}"] = {
                        "regs": kernel.n_regs, "spills": kernel.n_spills,
                        "warps": kernel.metadata.num_warps, "key": str(key)[-400:]}
                except Exception as e:  # noqa: BLE001 - a report, not a check
                    out[f"{name} {len(out)}"] = {"error": str(e)[:200]}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="16500,33000,48000,65536")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    H, Hkv, D = args.heads, args.kv_heads, args.head_dim
    lengths = [int(x) for x in args.lengths.split(",")]
    S, B, dtype = max(lengths), len(lengths), torch.bfloat16
    cfg = FlashPrefillConfig()
    g = torch.Generator(device="cuda").manual_seed(99)
    q = torch.randn(B, H, S, D, generator=g, device="cuda").to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g, device="cuda").to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=g, device="cuda").to(dtype)
    mask = torch.zeros(B, S, dtype=torch.int64, device="cuda")
    res = {"lengths": lengths, "alone": []}
    for b, n in enumerate(lengths):
        qi, ki, vi = planted_qkv(1, H, Hkv, n, D, seed=b, dtype=dtype, device="cuda")
        q[b, :, S - n:], k[b, :, S - n:], v[b, :, S - n:] = qi[0], ki[0], vi[0]
        mask[b, S - n:] = 1
        row = stages(qi, ki, vi, cfg, torch.ones(1, n, dtype=torch.int64, device="cuda"),
                     args.reps)
        row["plain_op_ms"] = cuda_time(lambda: flash_prefill(qi, ki, vi, enable_gqa=True,
                                                             config=cfg), args.reps)[0]
        # The path without a span: its selection and block-sparse attention over it.
        scale = D ** -0.5
        psel = dispatch.select(qi, ki, scale, cfg)
        row["plain_select_ms"] = cuda_time(lambda: dispatch.select(qi, ki, scale, cfg),
                                           args.reps)[0]
        row["plain_attend_ms"] = cuda_time(lambda: dispatch.sparse(
            qi, ki, vi, scale, cfg, psel.num, psel.idx), args.reps)[0]
        row["plain_density"] = psel.num.sum().item() / (H * (ku.cdiv(n, cfg.block_size)
                                                          * (ku.cdiv(n, cfg.block_size) + 1) / 2))
        row["tokens"] = n
        print(json.dumps(row), flush=True)
        res["alone"].append(row)
    res["batch"] = stages(q, k, v, cfg, mask, args.reps)
    print(json.dumps(res["batch"]), flush=True)
    res["search_parts"] = search_parts(qi, ki, cfg, args.reps)
    print(json.dumps(res["search_parts"]), flush=True)
    res["registers"] = registers()
    print(json.dumps(res["registers"]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
