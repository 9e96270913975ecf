"""Context-parallel simulator: K/V bytes per rank, dense ring vs selection-aware exchange, from
the op's real selections on planted-structure inputs (design: docs/context_parallel.md).

    python -m fp_compile.demo.cp_sim --seq-lens 16384 --device cpu            # CPU, seconds
    python -m fp_compile.demo.cp_sim --seq-lens 1048576,2097152,4194304 --ranks 4,8 \\
        --device cuda --json cp_sim.json                                      # one H200

For each sequence length and kv group, the group's G query heads are generated together
(``planted_qkv(1, G, 1, S, D, seed=seed + group)``: every group an independent planted input,
its heads taking the behaviours ``head % 4``), each head's selection is computed alone by
``dispatch.select`` (the Triton search on CUDA, the reference elsewhere) and expanded to a
kept-block mask, and the group's masks are reduced at once to per-rank counts
(``cp_exchange.group_exchange``) for every rank count and sharding; the compact index is freed
head by head, so one (M, M) index and one group's (G, M, M) mask are alive at a time.
``--sample-groups n`` simulates n of the kv groups and scales the selection-aware counts by
kv_heads / n (the output says so).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time

import torch

from .. import dense_history, dispatch
from ..config import FlashPrefillConfig
from ..kernels import utils as ku
from . import cp_exchange as cx
from .synthetic import planted_qkv

CONFIGS = {"default": FlashPrefillConfig, "paper": FlashPrefillConfig.paper_rule}

# H200 NVLink 4: 900 GB/s per GPU both directions together, 450 GB/s each way.
NVLINK_GBPS = 450.0
NVLINK_EFFICIENCY = 0.75


def keep_mask(num: torch.Tensor, idx: torch.Tensor, rows_per_chunk: int = 1024) -> torch.Tensor:
    """One head's compact selection, num (M,) and idx (M, M) int32, as a (M, M) bool mask.

    Built in row chunks so that the int64 scatter index stays small at M = 32K blocks.
    """
    M = idx.shape[-1]
    keep = torch.zeros(M, M + 1, dtype=torch.bool, device=idx.device)
    pos = torch.arange(M, device=idx.device)
    for i0 in range(0, M, rows_per_chunk):
        i1 = min(M, i0 + rows_per_chunk)
        cols = torch.where(pos[None, :] < num[i0:i1, None], idx[i0:i1], M)  # M: a dump column
        keep[i0:i1].scatter_(1, cols.long(), True)
    return keep[:, :M]


def group_selection(q: torch.Tensor, k: torch.Tensor, config: FlashPrefillConfig):
    """Kept-block masks (G, M, M) bool of one kv group, q (1, G, S, D), k (1, 1, S, D); with
    kv_num_blocks (1, G, M) and each head's selection time in ms on this device."""
    scale = ku.default_scale(q.shape[-1], None)
    masks, nums, times = [], [], []
    for h in range(q.shape[1]):
        if q.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        sel = dispatch.select(q[:, h:h + 1], k, scale, config)
        if q.device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
        masks.append(keep_mask(sel.num[0, 0], sel.idx[0, 0]))
        nums.append(sel.num)
        del sel
    return torch.stack(masks), torch.cat(nums, dim=1), times


def simulate(seq_len: int, ranks: list[int], shape: cx.Shape, configs: dict[str, object],
             device: str = "cpu", sample_groups: int | None = None, seed: int = 0,
             push_frac: float = 0.5, dense_tflops: float = 550.0, sparse_tflops: float = 380.0,
             gbps: float = NVLINK_GBPS, efficiency: float = NVLINK_EFFICIENCY) -> list[dict]:
    """One row per (config, ranks, sharding) at ``seq_len``: per-rank bytes and times."""
    b, G = shape.block_size, shape.group
    M = ku.cdiv(seq_len, b)
    for R in ranks:
        if seq_len % b or M % (2 * R):
            raise ValueError(f"seq_len {seq_len} must be a multiple of block_size * 2 * ranks "
                             f"({b * 2 * R})")
    groups = min(shape.kv_heads, sample_groups or shape.kv_heads)
    layouts = [(R, cx.SHARDINGS[name](M, R)) for R in ranks for name in cx.SHARDINGS]
    # bf16 where the Triton search runs; fp32 for the CPU reference
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    acc = {c: {"pull": [None] * len(layouts), "push": [None] * len(layouts), "tiles": 0,
               "ms": [], "dense_groups": 0} for c in configs}
    for g in range(groups):
        q, k, _ = planted_qkv(1, G, 1, seq_len, shape.head_dim, seed=seed + g, dtype=dtype,
                              device=device)
        for c, config in configs.items():
            config = config(block_size=b)
            keeps, num, times = group_selection(q, k, config)
            a = acc[c]
            a["tiles"] += int(num.sum())
            a["ms"] += times
            # the op's own rule: would this group have run dense (its density > dense_above)?
            a["dense_groups"] += int(dispatch.dense_groups(num, 1, config.dense_above).item())
            union = keeps.any(dim=0)
            for n, (R, sh) in enumerate(layouts):
                a["pull"][n] = cx.add_counts(
                    a["pull"][n], cx.group_exchange(keeps, sh, shape, None, union))
                a["push"][n] = cx.add_counts(
                    a["push"][n], cx.group_exchange(keeps, sh, shape, push_frac, union))
            del keeps, union
        del q, k
    scale = shape.kv_heads / groups
    rows = []
    for c, config in configs.items():
        config = config(block_size=b)
        a = acc[c]
        density = a["tiles"] / (groups * G * ku.causal_blocks(M))
        for n, (R, sh) in enumerate(layouts):
            traffic = cx.rank_traffic(sh, shape, a["pull"][n], a["push"][n], scale)
            times = cx.rank_times(sh, shape, a["pull"][n], a["push"][n], scale, dense_tflops,
                                  sparse_tflops)
            search = statistics.median(a["ms"]) * shape.heads / R
            rows.append({
                "config": c, "seq_len": seq_len, "ranks": R, "sharding": sh.name,
                "groups_simulated": groups, "kv_heads": shape.kv_heads, "density": density,
                "fallback_groups": a["dense_groups"],
                "whole_call_dense": a["dense_groups"] > dense_history.MOSTLY_DENSE * groups,
                "below_min_seq_len": seq_len < config.min_seq_len,
                "bytes": traffic, "compute_ms": times,
                "pull_counts": a["pull"][n], "push_counts": a["push"][n],
                "comm_ms": {key: [cx.comm_ms(x, gbps) for x in v] for key, v in traffic.items()},
                "comm_ms_eff": {key: [cx.comm_ms(x, gbps * efficiency) for x in v]
                                for key, v in traffic.items()},
                "search_ms_per_rank": search,
                "select_ms_per_head_median": statistics.median(a["ms"]),
            })
    return rows


STRATEGIES = ("ring_all", "ring_causal", "sel_pull", "sel_push")


def bytes_table(rows: list[dict]) -> str:
    """Markdown: the busiest rank's received GB per strategy (max over ranks)."""
    head = ("| config | S | R | sharding | density | fallback groups | ring all GB | "
            "ring causal GB | sel pull GB | sel pull+push GB | ring all / sel pull+push |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        m = {s: max(r["bytes"][s]) for s in STRATEGIES}
        ratio = m["ring_all"] / m["sel_push"] if m["sel_push"] else float("inf")
        lines.append(
            f"| {r['config']} | {r['seq_len']} | {r['ranks']} | {r['sharding']} | "
            f"{r['density']:.4f} | {r['fallback_groups']}/{r['groups_simulated']} | "
            + " | ".join(f"{m[s] / 1e9:.4g}" for s in STRATEGIES) + f" | {ratio:.1f}x |")
    return "\n".join(lines)


def time_table(rows: list[dict], gbps: float, efficiency: float) -> str:
    """Markdown: the busiest rank's communication and compute times (ms)."""
    eff = gbps * efficiency
    head = (f"| config | S | R | sharding | ring all ms @{gbps:g} / @{eff:g} GB/s | "
            f"sel pull+push ms @{gbps:g} / @{eff:g} | dense attn ms | sparse attn ms "
            "(pull / push) | search ms (this device) |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        c, ce, t = r["comm_ms"], r["comm_ms_eff"], r["compute_ms"]
        lines.append(
            f"| {r['config']} | {r['seq_len']} | {r['ranks']} | {r['sharding']} | "
            f"{max(c['ring_all']):.3g} / {max(ce['ring_all']):.3g} | "
            f"{max(c['sel_push']):.3g} / {max(ce['sel_push']):.3g} | {max(t['dense']):.3g} | "
            f"{max(t['sparse_pull']):.3g} / {max(t['sparse_push']):.3g} | "
            f"{r['search_ms_per_rank']:.3g} |")
    return "\n".join(lines)


def step_ms(row: dict, comm: str, compute: str) -> float:
    """Busiest rank's attention step with communication fully overlapped: max over ranks of
    max(comm at the effective bandwidth, compute); the search not included."""
    return max(max(c, t) for c, t in zip(row["comm_ms_eff"][comm], row["compute_ms"][compute]))


def step_table(rows: list[dict]) -> str:
    """Markdown: busiest-rank step estimates (overlap assumed) for four designs."""
    designs = (("ring_all", "dense"), ("ring_all", "sparse_pull"), ("ring_push", "sparse_push"),
               ("sel_push", "sparse_push"))
    head = ("| config | S | R | sharding | dense ring + dense attn ms | dense ring + sparse attn "
            "ms | dense ring + sparse attn, rows pushed ms | sel pull+push + sparse attn ms | "
            "+ search ms (this device) |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        steps = " | ".join(f"{step_ms(r, c, t):.3g}" for c, t in designs)
        lines.append(f"| {r['config']} | {r['seq_len']} | {r['ranks']} | {r['sharding']} | "
                     f"{steps} | {r['search_ms_per_rank']:.3g} |")
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fp_compile.demo.cp_sim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=_ints, default=[16384])
    p.add_argument("--ranks", type=_ints, default=[4, 8])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--dtype-bytes", type=int, default=2, help="K/V element size on the wire")
    p.add_argument("--configs", default="default,paper", help="of: " + ",".join(CONFIGS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--sample-groups", type=int, default=None,
                   help="simulate this many kv groups and scale to --kv-heads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--push-frac", type=float, default=0.5)
    p.add_argument("--gbps", type=float, default=NVLINK_GBPS,
                   help="per-direction link bandwidth, GB/s")
    p.add_argument("--efficiency", type=float, default=NVLINK_EFFICIENCY,
                   help="achievable fraction of --gbps")
    p.add_argument("--dense-tflops", type=float, default=550.0)
    p.add_argument("--sparse-tflops", type=float, default=380.0)
    p.add_argument("--json", default=None, help="write rows and settings here")
    args = p.parse_args(argv)
    if args.heads % args.kv_heads:
        p.error("--heads must be a multiple of --kv-heads")
    unknown = [c for c in args.configs.split(",") if c not in CONFIGS]
    if unknown:
        p.error(f"unknown --configs {unknown}")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    shape = cx.Shape(args.block_size, args.head_dim, args.heads, args.kv_heads, args.dtype_bytes)
    configs = {c: CONFIGS[c] for c in args.configs.split(",")}
    on_gpu = torch.device(args.device).type == "cuda"
    dev = torch.cuda.get_device_name(args.device) if on_gpu else platform.processor() or "cpu"
    meta = dict(vars(args), device_name=dev, torch=torch.__version__,
                date=datetime.date.today().isoformat())
    rows, t0 = [], time.perf_counter()
    for S in args.seq_lens:
        rows += simulate(S, args.ranks, shape, configs, args.device, args.sample_groups,
                         args.seed, args.push_frac, args.dense_tflops, args.sparse_tflops,
                         args.gbps, args.efficiency)
        meta["wall_s"] = time.perf_counter() - t0
        print(f"S={S}: done at {meta['wall_s']:.1f} s", file=sys.stderr, flush=True)
        if args.json:      # after every length, so that a run cut short keeps what it did
            with open(args.json, "w") as f:
                json.dump({"settings": meta, "rows": rows}, f, indent=1)
    groups = rows[0]["groups_simulated"]
    print(f"# Context-parallel K/V traffic, busiest rank (device {args.device}: {dev}; "
          f"B=1 H={args.heads} Hkv={args.kv_heads} D={args.head_dim} block={args.block_size}, "
          f"{args.dtype_bytes}-byte K/V; {groups} of {args.kv_heads} kv groups simulated"
          + (f", selection-aware figures scaled x{args.kv_heads / groups:g}" if
             groups < args.kv_heads else "") + f"; {meta['wall_s']:.1f} s)\n")
    print(bytes_table(rows) + "\n")
    print(time_table(rows, args.gbps, args.efficiency) + "\n")
    print(step_table(rows))
    return rows


if __name__ == "__main__":
    main()
