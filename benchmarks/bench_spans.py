"""Calls with a span on the GPU (issue 11): a left-padded batch and a prefill over a cached prefix.

1. A batch of prompts of different lengths (default 16,500 / 33,000 / 48,000 / 65,536 tokens,
   each ``planted_qkv`` at its own length), left padded to the longest with random values in
   the padding. The op takes the batch with its ``key_mask``; the same prompts also run one by
   one without padding. Dense baselines: cuDNN one by one (causal), and masked SDPA on the
   padded batch (the same mask; the backend SDPA picks for a boolean mask is recorded).
   Correctness in the same run: each row's valid output vs cuDNN on that prompt alone, and vs the
   op on that prompt alone. cuDNN with the same mask (an additive bias) on the padded batch
   too, checked against cuDNN on the longest prompt alone.
2. ``--new`` new tokens over a ``--prefix`` cached prefix (default 32K over 96K): the op with
   S_q < S_kv vs dense attention with the same (bottom-right causal) mask: cuDNN with an additive
   bias, and SDPA with ``causal_lower_right``; relative error vs dense in the same run.

GPU time of calls queued behind a sleep kernel (CUDA events, median of ``--reps``); the span path
reads nothing on the host (``torch.cuda.set_sync_debug_mode("error")`` around one call checks it).

    python benchmarks/bench_spans.py --out benchmarks/results/bench_spans.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fp_compile import FlashPrefillConfig, flash_prefill  # noqa: E402
from fp_compile.demo.bench import cuda_time, poison_allocator, rel_err  # noqa: E402
from fp_compile.demo.synthetic import planted_qkv  # noqa: E402


def cudnn(q, k, v, bias=None, causal=True):
    return torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, bias, False, 0.0, causal, False, scale=q.shape[-1] ** -0.5)[0]


def no_host_sync(fn) -> bool:
    """Whether one call of fn runs without a device-to-host synchronisation."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        ok = True
    except RuntimeError as e:
        ok = "synchroniz" not in str(e)
        if ok:
            raise
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return ok


def padded_batch(args, cfg, dtype) -> dict:
    H, Hkv, D = args.heads, args.kv_heads, args.head_dim
    lengths = [int(x) for x in args.lengths.split(",")]
    S = max(lengths)
    B = len(lengths)
    g = torch.Generator(device="cuda").manual_seed(99)
    q = torch.randn(B, H, S, D, generator=g, device="cuda").to(dtype)   # padding: random values
    k = torch.randn(B, Hkv, S, D, generator=g, device="cuda").to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=g, device="cuda").to(dtype)
    mask = torch.zeros(B, S, dtype=torch.int64, device="cuda")
    prompts = []
    for b, n in enumerate(lengths):
        qi, ki, vi = planted_qkv(1, H, Hkv, n, D, seed=args.seed + b, dtype=dtype, device="cuda")
        q[b, :, S - n:], k[b, :, S - n:], v[b, :, S - n:] = qi[0], ki[0], vi[0]
        mask[b, S - n:] = 1
        prompts.append((qi, ki, vi))
    poison_allocator(q)
    out = flash_prefill(q, k, v, enable_gqa=True, config=cfg, key_mask=mask)
    rows = []
    alone_ms, cudnn_ms = [], []
    for b, (qi, ki, vi) in enumerate(prompts):
        n = lengths[b]
        dense_i = cudnn(qi, ki, vi)
        alone = flash_prefill(qi, ki, vi, enable_gqa=True, config=cfg)
        rows.append({"tokens": n, "err_batched_vs_dense": rel_err(out[b:b + 1, :, S - n:],
                                                                   dense_i),
                     "err_alone_vs_dense": rel_err(alone, dense_i),
                     "batched_vs_alone": rel_err(out[b:b + 1, :, S - n:], alone)})
        del dense_i, alone
        alone_ms.append(cuda_time(lambda: flash_prefill(qi, ki, vi, enable_gqa=True,
                                                        config=cfg), args.reps)[0])
        cudnn_ms.append(cuda_time(lambda: cudnn(qi, ki, vi), args.reps)[0])
    pad_rows_zero = all(bool((out[b, :, :S - n] == 0).all()) for b, n in enumerate(lengths))
    finite = bool(out.isfinite().all())
    del out
    batch_ms = cuda_time(lambda: flash_prefill(q, k, v, enable_gqa=True, config=cfg,
                                               key_mask=mask), args.reps)[0]
    synced = no_host_sync(lambda: flash_prefill(q, k, v, enable_gqa=True, config=cfg,
                                                key_mask=mask))
    res = {"lengths": lengths, "rows": rows, "finite": finite, "padding_rows_zero": pad_rows_zero,
           "op_batch_ms": batch_ms, "op_alone_ms": alone_ms, "cudnn_alone_ms": cudnn_ms,
           "no_host_sync": synced}
    res["speedup_alone"] = sum(cudnn_ms) / sum(alone_ms)
    if not args.skip_masked_dense:
        # cuDNN with the same mask: an additive bias (B, 1, S, S), -inf off the padded causal
        # mask; checked on the longest row against cuDNN on that prompt alone.
        try:
            bias = torch.zeros(B, 1, S, S, dtype=dtype, device="cuda")
            bias.masked_fill_(~mask.bool()[:, None, None, :], float("-inf"))
            bias.masked_fill_(~torch.ones(S, S, dtype=torch.bool, device="cuda").tril(),
                              float("-inf"))
            got = cudnn(q, k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1),
                        bias, causal=False)
            n, (qi, ki, vi) = lengths[-1], prompts[-1]
            res["cudnn_bias_err_longest_row"] = rel_err(got[B - 1:, :, S - n:], cudnn(qi, ki, vi))
            del got
            kr, vr = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
            res["cudnn_bias_ms"] = cuda_time(lambda: cudnn(q, kr, vr, bias, causal=False),
                                             max(2, args.reps // 3))[0]
            res["speedup_batched_vs_cudnn_same_mask"] = res["cudnn_bias_ms"] / batch_ms
            del kr, vr
        except RuntimeError as e:
            res["cudnn_bias_error"] = str(e)[:200]
        bias = None
        torch.cuda.empty_cache()
        G = H // Hkv
        visible = mask.bool()[:, None, None, :] & torch.ones(
            S, S, dtype=torch.bool, device="cuda").tril()[None, None]
        kr, vr = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        try:
            res["masked_sdpa_ms"] = cuda_time(lambda: F.scaled_dot_product_attention(
                q, kr, vr, attn_mask=visible), max(2, args.reps // 3))[0]
            res["speedup_batched_vs_masked_sdpa"] = res["masked_sdpa_ms"] / batch_ms
        except RuntimeError as e:
            res["masked_sdpa_error"] = str(e)[:200]
        del visible, kr, vr
    res["speedup_batched_vs_cudnn_alone"] = sum(cudnn_ms) / batch_ms
    return res


def prefix(args, cfg, dtype) -> dict:
    H, Hkv, D = args.heads, args.kv_heads, args.head_dim
    S_kv, S_q = args.prefix + args.new, args.new
    q, k, v = planted_qkv(1, H, Hkv, S_kv, D, seed=args.seed, dtype=dtype, device="cuda")
    q = q[:, :, -S_q:].contiguous()
    res = {"prefix": args.prefix, "new": S_q}
    G = H // Hkv
    kr, vr = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    from torch.nn.attention.bias import causal_lower_right

    bias = causal_lower_right(S_q, S_kv)
    dense = F.scaled_dot_product_attention(q, kr, vr, attn_mask=bias)
    res["sdpa_lower_right_ms"] = cuda_time(
        lambda: F.scaled_dot_product_attention(q, kr, vr, attn_mask=bias), args.reps)[0]
    try:
        additive = torch.zeros(S_q, S_kv, dtype=dtype, device="cuda").masked_fill_(
            ~bias._materialize("cuda"), float("-inf"))[None, None]
        got = cudnn(q, kr, vr, additive, causal=False)
        res["cudnn_bias_err_vs_sdpa"] = rel_err(got, dense)
        del got
        res["cudnn_bias_ms"] = cuda_time(lambda: cudnn(q, kr, vr, additive, causal=False),
                                         args.reps)[0]
        del additive
    except RuntimeError as e:
        res["cudnn_bias_error"] = str(e)[:200]
    poison_allocator(q)
    out = flash_prefill(q, k, v, enable_gqa=True, config=cfg)
    res["finite"] = bool(out.isfinite().all())
    res["err_vs_dense"] = rel_err(out, dense)
    del out
    res["op_ms"] = cuda_time(lambda: flash_prefill(q, k, v, enable_gqa=True, config=cfg),
                             args.reps)[0]
    res["no_host_sync"] = no_host_sync(lambda: flash_prefill(q, k, v, enable_gqa=True,
                                                             config=cfg))
    best = min(res.get("cudnn_bias_ms", float("inf")), res["sdpa_lower_right_ms"])
    res["speedup_vs_best_dense"] = best / res["op_ms"]
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="16500,33000,48000,65536")
    p.add_argument("--prefix", type=int, default=98304)
    p.add_argument("--new", type=int, default=32768)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--parts", default="batch,prefix")
    p.add_argument("--skip-masked-dense", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dtype = torch.bfloat16
    cfg = FlashPrefillConfig()
    result = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "config": "FlashPrefillConfig() defaults"}
    import triton

    result["triton"] = triton.__version__
    if "batch" in args.parts:
        result["batch"] = padded_batch(args, cfg, dtype)
        print(json.dumps(result["batch"], indent=1), flush=True)
    if "prefix" in args.parts:
        result["prefix"] = prefix(args, cfg, dtype)
        print(json.dumps(result["prefix"], indent=1), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
