"""Long prompts on one GPU: the op's time and extra memory from 128K to 1M tokens.

Per length (B=1, H=32, Hkv=8, D=128, bf16, ``planted_qkv`` at strength 1, the benchmark's
standard inputs): the eager op with the default config and with ``paper_rule()``, both with the
selection built a chunk of query blocks at a time (``dispatch.INDEX_BYTES``), and, up to
``--whole-max``, the paper rule with the whole (B, H, M, M) index (INDEX_BYTES raised), as the
op ran before chunking. Columns: GPU time (calls queued behind a sleep kernel, median),
host-synced time, extra memory (peak during a call minus everything allocated before it and
the call's own output), density and error vs dense.

Error: up to ``--dense-max`` against cuDNN's whole output (cuDNN also timed); beyond it
(cuDNN at 1M takes about 17 s per call) on sampled query blocks (``--sample-blocks``, evenly
spaced, the last included) against exact fp32 attention of those rows, computed per kv group.
Both errors are reported where both exist, so the sampled figure can be compared with the full
one. Poisoned output memory before every checked call.

    python benchmarks/bench_scale.py --out results/ [--seq-lens 131072,262144,524288,1048576]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fp_compile  # noqa: E402
from fp_compile import FlashPrefillConfig, dispatch, flash_prefill  # noqa: E402
from fp_compile.demo.bench import cuda_time, poison_allocator, rel_err  # noqa: E402
from fp_compile.demo.synthetic import planted_qkv  # noqa: E402

from bench_guards import cudnn  # noqa: E402  (this directory is on sys.path when run)


def sampled_rows(S: int, block: int, n: int) -> list[tuple[int, int]]:
    """(r0, r1) of n query blocks evenly spaced over the prompt, the last one included."""
    M = -(-S // block)
    picks = sorted({M - 1 - round(c * (M - 1) / max(1, n - 1)) for c in range(n)})
    return [(i * block, min(S, (i + 1) * block)) for i in picks]


def exact_rows(q, k, v, r0: int, r1: int) -> torch.Tensor:
    """Exact causal attention (fp32) of query rows r0..r1-1 over keys 0..r1-1, per kv group."""
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    out = torch.empty(B, H, r1 - r0, D, device=q.device, dtype=torch.float32)
    cols = torch.arange(r1, device=q.device)
    rows = torch.arange(r0, r1, device=q.device)
    visible = cols[None, :] <= rows[:, None]
    for g in range(Hkv):
        qg = q[:, g * G:(g + 1) * G, r0:r1].float()
        kg, vg = k[:, g:g + 1, :r1].float(), v[:, g:g + 1, :r1].float()
        s = torch.matmul(qg, kg.transpose(-1, -2)) * D ** -0.5
        s = s.masked_fill(~visible, float("-inf"))
        out[:, g * G:(g + 1) * G] = torch.matmul(torch.softmax(s, dim=-1), vg)
        del s
    return out


def sampled_err(out, q, k, v, spans) -> float:
    num = den = 0.0
    for r0, r1 in spans:
        want = exact_rows(q, k, v, r0, r1)
        num += float((out[:, :, r0:r1].float() - want).pow(2).sum())
        den += float(want.pow(2).sum())
    return (num / den) ** 0.5


def extra_memory_mb(fn) -> tuple[float, object]:
    """Peak allocated during fn() beyond what was allocated before, minus fn's output."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return (peak - base - out.numel() * out.element_size()) / 2**20, out


def measure(q, k, v, cfg, index_bytes: int, reps: int, dense_out, spans) -> dict:
    saved = dispatch.INDEX_BYTES
    dispatch.INDEX_BYTES = index_bytes
    try:
        def call():
            return flash_prefill(q, k, v, enable_gqa=True, config=cfg)

        B, H, S, _ = q.shape
        M = -(-S // cfg.block_size)
        res = {"chunks": -(-M // dispatch.chunk_rows(B, H, M))}
        call()                                    # warm-up (autotuning) before the memory
        poison_allocator(q)
        res["extra_mem_mb"], out = extra_memory_mb(call)
        res["finite"] = bool(out.isfinite().all())
        if dense_out is not None:
            res["err"] = rel_err(out, dense_out)
        res["sampled_err"] = sampled_err(out, q, k, v, spans)
        del out
        res["ms"], res["spread"] = cuda_time(call, reps)
        res["sync_ms"], _ = cuda_time(call, reps, sync=True)
        fp_compile.reset_stats()
        flash_prefill(q, k, v, enable_gqa=True, config=cfg.replace(collect_stats=True))
        (row,) = fp_compile.stats().rows
        res["density"], res["dense_heads"] = row.density, row.n_dense_heads
        fp_compile.reset_stats()
        return res
    finally:
        dispatch.INDEX_BYTES = saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-lens", default="131072,262144,524288,1048576")
    p.add_argument("--dense-max", type=int, default=524288,
                   help="longest length where cuDNN is run (timed, and the error reference)")
    p.add_argument("--whole-max", type=int, default=524288,
                   help="longest length where the paper rule also runs with the whole index")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--sample-blocks", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    dtype = torch.bfloat16
    variants = [("default", FlashPrefillConfig(), dispatch.INDEX_BYTES),
                ("paper", FlashPrefillConfig.paper_rule(), dispatch.INDEX_BYTES)]
    rows = []
    for S in (int(s) for s in args.seq_lens.split(",")):
        q, k, v = planted_qkv(1, args.heads, args.kv_heads, S, args.head_dim, seed=args.seed,
                              dtype=dtype, device="cuda")
        reps = max(2, min(args.reps, int(2e6 / S)))
        spans = sampled_rows(S, FlashPrefillConfig().block_size, args.sample_blocks)
        row = {"S": S, "reps": reps}
        dense_out = None
        if S <= args.dense_max:
            dense_out = cudnn(q, k, v)
            row["cudnn_ms"], _ = cuda_time(lambda: cudnn(q, k, v), reps)
            row["cudnn_sampled_err"] = sampled_err(dense_out, q, k, v, spans)
        todo = list(variants)
        if S <= args.whole_max:
            todo.append(("paper_whole_index", FlashPrefillConfig.paper_rule(), 1 << 62))
        for name, cfg, index_bytes in todo:
            row[name] = measure(q, k, v, cfg, index_bytes, reps, dense_out, spans)
            print(json.dumps({"S": S, name: row[name]}), flush=True)
        del q, k, v, dense_out
        torch.cuda.empty_cache()
        rows.append(row)

    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"{datetime.date.today()}; B=1 H={args.heads} Hkv={args.kv_heads} D={args.head_dim} "
          "bf16, planted strength 1\n")
    print("| S | cuDNN ms | variant | chunks | op ms | host-synced ms | x cuDNN | extra MB | "
          "density | err vs cuDNN | sampled err | finite |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        for name in ("default", "paper", "paper_whole_index"):
            if name not in row:
                continue
            r = row[name]
            cud = row.get("cudnn_ms")
            x = f"{cud / r['ms']:.2f}" if cud else "-"
            cud_s = f"{cud:.1f}" if cud else "-"
            print(f"| {row['S']} | {cud_s} | {name} | "
                  f"{r['chunks']} | {r['ms']:.2f} | {r['sync_ms']:.2f} | {x} | "
                  f"{r['extra_mem_mb']:.0f} | {r['density']:.4f} | "
                  f"{r.get('err', float('nan')):.3f} | {r['sampled_err']:.3f} | {r['finite']} |")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_scale.json"), "w") as f:
            json.dump({"date": str(datetime.date.today()), "device": torch.cuda.get_device_name(),
                       "torch": torch.__version__, "args": vars(args), "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
