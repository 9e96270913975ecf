"""FP8 (e4m3) block-sparse attention vs bf16 on the H200: speed and error vs dense.

For each length (B=1, H=32, Hkv=8, D=128, bf16, planted inputs of strength 1) the default
config's selection, then GPU times (CUDA events around calls queued behind a sleep, median of
``--reps``) of: the bf16 attention kernel alone; FP8 quantisation + attention; the FP8
attention alone (inputs quantised beforehand); the whole op with the default config, bf16 vs
``fp8_attention=True``. Errors are relative L2 vs dense cuDNN SDPA, each output computed into
NaN-poisoned memory first. Prints a markdown table and the JSON (``--out`` writes it too).

    python benchmarks/bench_fp8.py [--seq-lens 32768,65536,131072] [--out results/fp8.json]

The issue's bar: FP8 >= 1.5x faster attention than bf16 at 32K-128K with relative L2 vs dense
at most 0.01 above the bf16 op's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fp_compile import FlashPrefillConfig, dispatch, flash_prefill, fp8  # noqa: E402
from fp_compile.demo.bench import cuda_time, poison_allocator, rel_err  # noqa: E402
from fp_compile.demo.synthetic import planted_qkv  # noqa: E402
from fp_compile.kernels.block_sparse_attention import block_sparse_attention  # noqa: E402
from fp_compile.kernels.block_sparse_attention_fp8 import (  # noqa: E402
    block_sparse_attention_fp8)
from fp_compile.kernels.fp8_quant import quantize_blocks  # noqa: E402

COLUMNS = ["S", "density", "bf16_attn_ms", "fp8_quant_attn_ms", "fp8_attn_only_ms",
           "attn_speedup", "op_bf16_ms", "op_fp8_ms", "op_speedup", "err_attn_bf16",
           "err_attn_fp8", "err_op_bf16", "err_op_fp8", "meets_bar"]


def checked(fn, like, dense):
    """fn()'s output (into NaN-poisoned memory) and its relative L2 vs dense."""
    poison_allocator(like)
    out = fn()
    torch.cuda.synchronize()
    if not out.isfinite().all():
        raise AssertionError("non-finite output (unwritten elements?)")
    return rel_err(out, dense)


def bench_one(S: int, reps: int) -> dict:
    cfg = FlashPrefillConfig()
    cfg8 = cfg.replace(fp8_attention=True)
    bs = cfg.block_size
    q, k, v = planted_qkv(1, 32, 8, S, 128, seed=0, dtype=torch.bfloat16, device="cuda",
                          strength=1.0)
    scale = 128 ** -0.5
    sel = dispatch.select(q, k, scale, cfg)
    num, idx = sel.num, sel.idx
    M = idx.shape[-1]
    density = num.sum().item() / (num.numel() * (M + 1) / 2)
    dense = dispatch.dense(q, k, v, scale)
    q8, k8, v8 = quantize_blocks(q, bs), quantize_blocks(k, bs), quantize_blocks(v, bs, True)

    fns = {
        "bf16_attn": lambda: block_sparse_attention(q, k, v, num, idx, scale, bs),
        "fp8_quant_attn": lambda: fp8.attend(q, k, v, scale, cfg8, num, idx, triton=True),
        "fp8_attn_only": lambda: block_sparse_attention_fp8(q8, k8, v8, num, idx, scale, bs,
                                                            torch.empty_like(q)),
        "op_bf16": lambda: flash_prefill(q, k, v, enable_gqa=True, config=cfg),
        "op_fp8": lambda: flash_prefill(q, k, v, enable_gqa=True, config=cfg8),
    }
    errs = {name: checked(fn, q, dense) for name, fn in fns.items()}
    ms = {name: cuda_time(fn, reps)[0] for name, fn in fns.items()}
    row = {"S": S, "density": round(density, 4)}
    row.update({f"{name}_ms": round(t, 4) for name, t in ms.items()})
    row["attn_speedup"] = round(ms["bf16_attn"] / ms["fp8_quant_attn"], 3)
    row["op_speedup"] = round(ms["op_bf16"] / ms["op_fp8"], 3)
    row.update(err_attn_bf16=errs["bf16_attn"], err_attn_fp8=errs["fp8_quant_attn"],
               err_attn_fp8_only=errs["fp8_attn_only"], err_op_bf16=errs["op_bf16"],
               err_op_fp8=errs["op_fp8"])
    row["meets_bar"] = bool(row["attn_speedup"] >= 1.5
                            and errs["op_fp8"] <= errs["op_bf16"] + 0.01)
    return row


def table(rows) -> str:
    def cell(x):
        return f"{x:.4g}" if isinstance(x, float) else str(x)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-lens", default="32768,65536,131072")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default=None, help="write the JSON here too")
    args = p.parse_args()
    rows = []
    for S in (int(s) for s in args.seq_lens.split(",")):
        rows.append(bench_one(S, max(3, min(args.reps, int(args.reps * 65536 / S)))))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "date": datetime.date.today().isoformat(),
              "args": vars(args), "rows": rows}
    print(table(rows))
    print(json.dumps(result, indent=1))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
