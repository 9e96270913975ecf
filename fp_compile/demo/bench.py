"""Kernel benchmark: FlashPrefill op vs cuDNN / flash SDPA and FlexAttention on the same blocks.

    python -m fp_compile bench --out results/                    # H200: about 5 minutes
    python benchmarks/bench_attention.py --out results/          # the same, from a clone

Inputs carry planted attention structure (fp_compile.demo.synthetic). Every row is checked against
dense attention before it is timed: the op's error vs dense (what sparsity costs) and the
attention kernel vs compiled FlexAttention on the same BlockMask (should agree to rounding).
Times are medians of CUDA-event timings after warm-up. Writes a JSON, a CSV and a PNG to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import traceback

import torch
import torch.nn.functional as F

from ..api import flash_prefill, select_blocks
from ..config import FlashPrefillConfig
from .synthetic import planted_qkv


# About 50 ms on an H200 (1.98 GHz): enough for the host to queue every timed call.
SLEEP_CYCLES = 100_000_000


def cuda_time(fn, reps: int, warmup: int = 2, sync: bool = False) -> tuple[float, float]:
    """Median and (max - min) / 2 of ``reps`` CUDA-event timings in ms (GPU time), after warm-up.

    The calls are queued behind a sleep kernel so that the host runs ahead of the GPU and
    each event pair brackets only the GPU's work, as in a model whose launches are queued
    asynchronously. ``sync=True`` instead syncs after each call without the sleep, so the time
    also holds the call's host overhead (for a compiled function at 2K-4K tokens as large as
    the kernels: run 7 in RESULTS.md).
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    if not sync:
        torch.cuda._sleep(SLEEP_CYCLES)
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
        if sync:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return statistics.median(times), (max(times) - min(times)) / 2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def sdpa_backend(backend):
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel([backend])


def dense_fn(q, k, v, backend):
    from torch.nn.attention import SDPBackend

    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]
    # Dense kernels get k/v repeated to H heads (not every backend takes enable_gqa); the copy
    # is made once, outside the timed region.
    rep = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)

    def run():
        with sdpa_backend(be):
            return F.scaled_dot_product_attention(q, kr, vr, is_causal=True)

    return run


def poison_allocator(like: torch.Tensor) -> None:
    """Fill memory the next allocation of like's size will reuse with NaN, then free it: an
    output element the kernels fail to write then shows up as non-finite."""
    t = torch.full_like(like, float("nan"))
    del t


class Compiled:
    """The op and its two stages compiled per config, as a user's compiled model runs them:
    launches come from Inductor's generated code."""

    def __init__(self, cfg: FlashPrefillConfig):
        from ..kernels.block_sparse_attention import block_sparse_attention
        from ..kernels.pattern_search import pattern_search

        self.cfg = cfg

        def op(q, k, v):
            return flash_prefill(q, k, v, enable_gqa=True, config=cfg)

        def search(q, k):
            return pattern_search(q, k, q.shape[-1] ** -0.5, cfg.block_size, cfg.alpha,
                                  cfg.sink_blocks, cfg.window_blocks, cfg.last_dense_blocks,
                                  gqa_shared=cfg.gqa_shared, row_stride=cfg.search_stride)

        def attn(q, k, v, num, idx):
            return block_sparse_attention(q, k, v, num, idx, q.shape[-1] ** -0.5,
                                          cfg.block_size)

        # Static shapes: a graph per length, the op's kernels inlined into Inductor's code (a
        # symbolic length routes the op through its opaque run-time dispatch instead).
        self.op = torch.compile(op, fullgraph=True, dynamic=False)
        # The parts static too, as inside the op: compiled with a symbolic length the search
        # took 3.30 ms at 128K in run 10, launched eagerly 2.63 ms (same kernel and config).
        self.search = torch.compile(search, fullgraph=True, dynamic=False)
        self.attn = torch.compile(attn, fullgraph=True, dynamic=False)


def bench_one(S: int, args, flex_compiled, fns: Compiled, default_op) -> dict:
    from ..kernels.pattern_search import pattern_search_reference

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    B, H, Hkv, D = 1, args.heads, args.kv_heads, args.head_dim
    q, k, v = planted_qkv(B, H, Hkv, S, D, seed=args.seed, dtype=dtype, device="cuda")
    scale = 1 / math.sqrt(D)
    cfg = fns.cfg
    reps = max(3, min(args.reps, int(2e5 / S)))
    row = {"S": S, "reps": reps}

    cudnn = dense_fn(q, k, v, "cudnn")
    dense_out = cudnn()
    row["cudnn_ms"], row["cudnn_spread"] = cuda_time(cudnn, reps)
    row["cudnn_sync_ms"], _ = cuda_time(cudnn, reps, sync=True)
    flash = dense_fn(q, k, v, "flash")
    row["flash_vs_cudnn_err"] = rel_err(flash(), dense_out)
    row["flash_ms"], _ = cuda_time(flash, reps)

    # The op (sparse at every S), compiled; poisoned output memory first.
    poison_allocator(q)
    out = fns.op(q, k, v)
    row["op_finite"] = bool(out.isfinite().all())
    row["err_vs_dense"] = rel_err(out, dense_out)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fns.op(q, k, v)
    torch.cuda.synchronize()
    # Beyond the inputs and the output itself: index tensors and scratch.
    row["op_extra_mem_mb"] = (torch.cuda.max_memory_allocated() - base
                              - q.numel() * q.element_size()) / 2**20
    row["op_ms"], row["op_spread"] = cuda_time(lambda: fns.op(q, k, v), reps)
    row["op_sync_ms"], _ = cuda_time(lambda: fns.op(q, k, v), reps, sync=True)

    # The op with the default dispatch: dense (cuDNN) below min_seq_len, else the same
    # compiled path as above.
    if S < args.min_seq_len:
        poison_allocator(q)
        out_d = default_op(q, k, v)
        row["op_default_finite"] = bool(out_d.isfinite().all())
        row["op_default_err"] = rel_err(out_d, dense_out)
        row["op_default_ms"], _ = cuda_time(lambda: default_op(q, k, v), reps)
        row["op_default_sync_ms"], _ = cuda_time(lambda: default_op(q, k, v), reps, sync=True)
        del out_d
    else:
        row["op_default_ms"] = row["op_ms"]

    num, idx = fns.search(q, k)
    row["search_ms"], _ = cuda_time(lambda: fns.search(q, k), reps)
    # Selection vs the plain-torch reference: share of (row, block) decisions that differ.
    rnum, ridx = pattern_search_reference(q, k, scale, cfg.block_size, cfg.alpha,
                                          cfg.sink_blocks, cfg.window_blocks,
                                          cfg.last_dense_blocks, gqa_shared=cfg.gqa_shared,
                                          row_stride=cfg.search_stride)
    M = idx.shape[-1]
    row["search_num_diff_rows"] = int((rnum != num).sum().item())
    row["search_kept_diff"] = abs(int(rnum.sum().item()) - int(num.sum().item()))
    del rnum, ridx
    poison_allocator(q)
    attn = fns.attn(q, k, v, num, idx)
    row["attn_finite"] = bool(attn.isfinite().all())
    row["attn_ms"], _ = cuda_time(lambda: fns.attn(q, k, v, num, idx), reps)
    kept = num.sum().item()
    row["density"] = kept / (num.numel() * (M + 1) / 2)
    # Effective attention throughput on the kept blocks (QK^T and PV, diagonal counted half).
    flops = 4 * D * cfg.block_size * cfg.block_size * (kept - num.numel() / 2)
    row["attn_tflops"] = flops / (row["attn_ms"] * 1e-3) / 1e12

    if flex_compiled is not None:
        sel = select_blocks(q, k, config=cfg)
        row["search_matches_select_blocks"] = bool(torch.equal(sel.kv_num_blocks, num))
        bm = sel.to_block_mask()
        flex_out = flex_compiled(q, k, v, block_mask=bm, enable_gqa=True)
        row["attn_vs_flex_err"] = rel_err(attn, flex_out)
        row["flex_ms"], _ = cuda_time(
            lambda: flex_compiled(q, k, v, block_mask=bm, enable_gqa=True), reps)
        row["attn_speedup_vs_flex"] = row["flex_ms"] / row["attn_ms"]
        del sel, bm, flex_out
    row["speedup_vs_cudnn"] = row["cudnn_ms"] / row["op_ms"]
    row["default_speedup_vs_cudnn"] = row["cudnn_ms"] / row["op_default_ms"]
    row["search_share"] = row["search_ms"] / row["op_ms"]
    q = k = v = out = dense_out = attn = None   # free them before empty_cache
    torch.cuda.empty_cache()
    return row


def bench_variant(S: int, name: str, fns: Compiled, args, with_recall: bool) -> dict:
    """One option of the config (issue: accuracy beyond the paper) at one length."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    q, k, v = planted_qkv(1, args.heads, args.kv_heads, S, args.head_dim, seed=args.seed,
                          dtype=dtype, device="cuda")
    reps = max(3, min(args.reps, int(1e5 / S)))
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    poison_allocator(q)
    out = fns.op(q, k, v)
    row = {"variant": name, "S": S, "finite": bool(out.isfinite().all()),
           "err_vs_dense": rel_err(out, dense)}
    row["op_ms"], _ = cuda_time(lambda: fns.op(q, k, v), reps)
    sel = select_blocks(q, k, config=fns.cfg)
    row["density"] = sel.density
    if with_recall:
        row["recall"] = sel.recall(q, k)
    q = k = v = out = dense = sel = None   # free them before empty_cache
    torch.cuda.empty_cache()
    return row


# Options beyond the paper, each measured against the paper's rule (guards off in every one)
_PAPER = {"mass_floor": 0.0, "dense_above": 1.0}
VARIANTS = {"paper_rule": _PAPER, "mean_correction": {**_PAPER, "mean_correction": True},
            "gqa_shared": {**_PAPER, "gqa_shared": True},
            "vertical_slash": {**_PAPER, "vertical_slash": True}}


COLUMNS = [("S", "{:>7}"), ("cudnn_ms", "{:8.2f}"), ("flash_ms", "{:8.2f}"),
           ("flex_ms", "{:8.2f}"), ("op_ms", "{:8.2f}"), ("op_default_ms", "{:8.2f}"),
           ("search_ms", "{:7.2f}"),
           ("attn_ms", "{:7.2f}"), ("density", "{:6.3f}"), ("err_vs_dense", "{:7.4f}"),
           ("attn_vs_flex_err", "{:8.1e}"), ("attn_tflops", "{:6.0f}"),
           ("speedup_vs_cudnn", "{:6.2f}"), ("attn_speedup_vs_flex", "{:6.2f}"),
           ("search_share", "{:5.2f}"), ("op_extra_mem_mb", "{:7.0f}")]
VARIANT_COLUMNS = [("variant", "{:>16}"), ("S", "{:>7}"), ("op_ms", "{:8.2f}"),
                   ("density", "{:6.3f}"), ("err_vs_dense", "{:7.4f}"), ("recall", "{:6.3f}")]


def table(rows, columns=COLUMNS) -> str:
    head = " | ".join(name for name, _ in columns)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(" | ".join(fmt.format(r[name]) if name in r else "-" for name, fmt in columns))
    return "\n".join(lines)


def plot(rows, path):
    if not rows:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    S = [r["S"] for r in rows]
    for key, label in [("cudnn_ms", "cuDNN SDPA"), ("flash_ms", "flash SDPA"),
                       ("flex_ms", "FlexAttention (same blocks)"), ("op_ms", "fp_compile op")]:
        if all(key in r for r in rows):
            ax.plot(S, [r[key] for r in rows], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("ms (median)")
    ax.set_title("causal prefill attention, planted structure")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None, prog=None):
    """Parse ``argv`` (sys.argv[1:] when None) and run the benchmark; ``prog`` names the command
    in usage and error messages."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seq-lens", default="4096,8192,16384,32768,65536,131072")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--alpha", type=float, default=FlashPrefillConfig().alpha)
    p.add_argument("--config", default="{}", help="extra FlashPrefillConfig fields as JSON")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="config options timed and checked at --variant-seq-lens ('' for none)")
    p.add_argument("--variant-seq-lens", default="32768,131072")
    p.add_argument("--recall-max-seq-len", type=int, default=32768)
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention needs a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    import triton

    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "date": datetime.date.today().isoformat(),
            "args": vars(args)}
    base = FlashPrefillConfig(alpha=args.alpha, block_size=args.block_size,
                              **json.loads(args.config))
    fns = Compiled(base.replace(min_seq_len=0))
    default_op = torch.compile(
        lambda q, k, v: flash_prefill(q, k, v, enable_gqa=True, config=base),
        fullgraph=True, dynamic=False)
    meta["min_seq_len"] = args.min_seq_len = base.min_seq_len
    # One graph per length and config: allow more recompiles than dynamo's default (restored
    # on exit).
    limit = torch._dynamo.config.patch(recompile_limit=64)
    limit.__enter__()
    rows = []
    for S in [int(s) for s in args.seq_lens.split(",")]:
        try:
            rows.append(bench_one(S, args, flex, fns, default_op))
            print(json.dumps(rows[-1]), flush=True)
        except Exception:  # report (OOM included), keep the rows measured so far
            traceback.print_exc()
            print(f"S={S}: failed", flush=True)
            torch.cuda.empty_cache()
    variant_rows = []
    for name in [n for n in args.variants.split(",") if n]:
        vf = Compiled(base.replace(min_seq_len=0, **VARIANTS[name]))
        for S in [int(s) for s in args.variant_seq_lens.split(",")]:
            try:
                variant_rows.append(bench_variant(S, name, vf, args,
                                                  S <= args.recall_max_seq_len))
                print(json.dumps(variant_rows[-1]), flush=True)
            except Exception:
                traceback.print_exc()
                print(f"{name} S={S}: failed", flush=True)
                torch.cuda.empty_cache()
    limit.__exit__(None, None, None)
    with open(os.path.join(args.out, "bench_attention.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "variants": variant_rows}, f, indent=1)
    with open(os.path.join(args.out, "bench_attention.csv"), "w") as f:
        keys = sorted({k for r in rows for k in r})
        f.write(",".join(keys) + "\n")
        for r in rows:
            f.write(",".join(str(r.get(k, "")) for k in keys) + "\n")
    plot(rows, os.path.join(args.out, "bench_attention.png"))
    print(f"\n{meta['gpu']}  torch {meta['torch']}  triton {meta['triton']}  {meta['date']}  "
          f"B=1 H={args.heads} Hkv={args.kv_heads} D={args.head_dim} {args.dtype} "
          f"alpha={args.alpha} config={args.config}")
    print(table(rows))
    if variant_rows:
        print()
        print(table(variant_rows, VARIANT_COLUMNS))

