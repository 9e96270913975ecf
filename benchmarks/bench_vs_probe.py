"""The vertical/slash probe on the GPU (issue 14): its Triton variants vs the plain-torch reference.

Per length, one JSON line per row:

* ``check``: per variant, the kernel's scores against the reference's (max abs difference) and
  whether its flags equal the reference's, from its scores (``flags_from_scores``) and from its
  own flag path (``vertical_slash_flags``; "skew" computes them in its last kernel);
* ``scores``: GPU time (calls queued, median) of ``vertical_slash_scores`` per variant and launch
  setting (num_warps; programs per SM for "skew"; with and without the diagonal sums);
* ``flags``: the whole stage, ``vertical_slash_flags``, per variant and for the reference;
* ``search`` (``--op``): the paper rule's search without the detector's flags and with them;
* ``op`` (``--op``): the op (``flash_prefill``, the paper's rule) without the detector and with
  it, per variant (``DEFAULT_VARIANT`` set for the call), and the stage's share of the op; then
  the default config without the detector and with it at ``--op-threshold``.

``--rows``: the probe rows, 0 the last query block's, n the prompt's last n rows
(``FlashPrefillConfig.vs_rows``); every row above is repeated per value (the last-rows probes
time the "skew" settings only).

B 1, H 32, Hkv 8, D 128, bf16, block 128, ``planted_qkv`` seed 0 (options change them).

    python benchmarks/bench_vs_probe.py --op --out results/bench_vs_probe.json   # H200: ~2 min
    TRITON_INTERPRET=1 python benchmarks/bench_vs_probe.py --device cpu --seq-lens 512 \\
        --heads 4 --kv-heads 2 --head-dim 32 --dtype fp32 --reps 1     # CPU smoke run, wall time
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fp_compile.demo.bench import cuda_time  # noqa: E402
from fp_compile.demo.synthetic import planted_qkv  # noqa: E402
from fp_compile.kernels import vertical_slash as vs  # noqa: E402
from fp_compile.kernels import vertical_slash_skew as skew  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# (variant, launch options) timed for the scores; the first of each variant is its default
SCORE_SETTINGS = [
    ("gather", dict(num_warps=8)),
    ("gather", dict(num_warps=4)),
    ("gather", dict(num_warps=8, diagonals=False)),
    ("skew", dict(num_warps=8, programs_per_sm=2)),
    ("skew", dict(num_warps=8, programs_per_sm=1)),
    ("skew", dict(num_warps=8, programs_per_sm=4)),
    ("skew", dict(num_warps=4, programs_per_sm=2)),
    ("skew", dict(num_warps=4, programs_per_sm=4)),
    ("skew", dict(num_warps=4, programs_per_sm=2, keys=64)),
    ("skew", dict(num_warps=4, programs_per_sm=4, keys=64)),
    ("skew", dict(num_warps=8, programs_per_sm=4, keys=64)),
    ("skew", dict(num_warps=4, programs_per_sm=8, keys=64)),
    ("skew", dict(num_warps=4, programs_per_sm=4, keys=32)),
    ("skew", dict(num_warps=4, programs_per_sm=8, keys=32)),
    ("skew", dict(num_warps=8, programs_per_sm=2, diagonals=False)),
]


def wall_time(fn, reps: int, warmup: int = 1) -> tuple[float, float]:
    """``cuda_time``'s stand-in off the GPU: median and half spread of wall times in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), (max(times) - min(times)) / 2


def check_rows(q, k, scale, bs, thr, n_rows=None):
    """One ``check`` row per variant: scores and flags against the reference."""
    ref_col, ref_diag = vs.vertical_slash_scores_reference(q, k, scale, bs, n_rows)
    want = vs.flags_from_scores(ref_col, ref_diag, bs, thr)
    near = float(min((ref_col - thr).abs().min(), (ref_diag - thr).abs().min()))
    rows = []
    for variant in vs.VARIANTS:
        col, diag = vs.vertical_slash_scores(q, k, scale, bs, variant=variant, n_rows=n_rows)
        got = vs.flags_from_scores(col, diag, bs, thr)
        own = vs.vertical_slash_flags(q, k, scale, bs, thr, variant=variant, n_rows=n_rows)
        rows.append({
            "row": "check", "variant": variant,
            "column_max_diff": (col - ref_col).abs().max().item(),
            "diagonal_max_diff": (diag - ref_diag).abs().max().item(),
            "flags_equal": bool(torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])),
            "own_flags_equal": bool(torch.equal(own[0], want[0])
                                    and torch.equal(own[1], want[1])),
            "closest_score_to_threshold": near,
            "heavy_column_blocks": int(want[0].sum()),
            "heavy_diagonal_blocks": int(want[1].sum())})
        del col, diag
    return rows


def op_rows(q, k, v, S, timer, reps, n_rows=None, op_threshold=0.005):
    """The op without the detector and with it, per variant; the stage's share of the op. Then
    the default config without and with the detector (default variant, ``op_threshold``)."""
    from fp_compile import FlashPrefillConfig, flash_prefill

    def op(cfg):
        return lambda: flash_prefill(q, k, v, enable_gqa=True, config=cfg)

    base = FlashPrefillConfig.paper_rule()
    with_vs = FlashPrefillConfig.paper_rule(vertical_slash=True, vs_rows=n_rows or 0)
    base_ms = timer(op(base), reps)[0]
    rows = [{"row": "op", "config": "paper", "variant": "none", "S": S, "op_ms": base_ms}]
    default = vs.DEFAULT_VARIANT
    try:
        for variant in (vs.VARIANTS if n_rows is None else ("skew",)):
            vs.DEFAULT_VARIANT = variant
            ms = timer(op(with_vs), reps)[0]
            rows.append({"row": "op", "config": "paper", "variant": variant, "S": S,
                         "vs_rows": n_rows or 0, "op_ms": ms, "stage_ms": ms - base_ms,
                         "stage_share": (ms - base_ms) / base_ms})
    finally:
        vs.DEFAULT_VARIANT = default
    plain = FlashPrefillConfig()
    detector = plain.replace(vertical_slash=True, vs_rows=n_rows or 0, vs_threshold=op_threshold)
    plain_ms = timer(op(plain), reps)[0]
    ms = timer(op(detector), reps)[0]
    rows.append({"row": "op", "config": "default", "variant": "none", "S": S, "op_ms": plain_ms})
    rows.append({"row": "op", "config": "default", "variant": vs.DEFAULT_VARIANT, "S": S,
                 "vs_rows": n_rows or 0, "vs_threshold": op_threshold, "op_ms": ms,
                 "stage_ms": ms - plain_ms, "stage_share": (ms - plain_ms) / plain_ms})
    return rows


def search_rows(q, k, scale, bs, n_rows, timer, reps):
    """The paper rule's search (``pattern_search``, key means given) without the detector's
    flags and with them (uint8 as the op passes them, and bool, which the search copies): what
    the flags cost the search. Checked: with the flags, every row keeps a superset."""
    from fp_compile import FlashPrefillConfig
    from fp_compile.kernels.block_means import block_means
    from fp_compile.kernels.pattern_search import pattern_search
    from fp_compile.kernels.utils import expand_indices

    cfg = FlashPrefillConfig.paper_rule()
    kmean = block_means(k, bs, out_dtype=q.dtype)
    flags = skew.skew_scores(q, k, scale, bs, threshold=cfg.vs_threshold, n_rows=n_rows,
                             flag_dtype=torch.uint8)

    def search(vs_blocks):
        return lambda: pattern_search(q, k, scale, bs, cfg.alpha, cfg.sink_blocks,
                                      cfg.window_blocks, cfg.last_dense_blocks, kmean=kmean,
                                      vs_blocks=vs_blocks)

    num0, idx0 = search(None)()
    num1, idx1 = search(flags)()
    superset = bool((expand_indices(num1, idx1) | ~expand_indices(num0, idx0)).all())
    rows = [{"row": "search", "flags": "none", "ms": timer(search(None), reps)[0],
             "kept": int(num0.sum())}]
    for name, vs_blocks in (("uint8", flags), ("bool", tuple(f.bool() for f in flags))):
        rows.append({"row": "search", "flags": name, "ms": timer(search(vs_blocks), reps)[0],
                     "kept": int(num1.sum()), "superset": superset})
    return rows


def length_rows(args, S, timer, emit) -> None:
    q, k, v = planted_qkv(1, args.heads, args.kv_heads, S, args.head_dim, seed=0,
                          dtype=DTYPES[args.dtype], device=args.device)
    scale, bs, thr = args.head_dim ** -0.5, args.block_size, args.threshold
    for n_rows in [int(r) or None for r in args.rows.split(",")]:
        rows_rows(q, k, v, S, scale, bs, thr, n_rows, args, timer, emit)


def rows_rows(q, k, v, S, scale, bs, thr, n_rows, args, timer, emit) -> None:
    """Every row of one length for one probe-row setting (``n_rows``, None: the last block)."""
    tag = {"S": S, "vs_rows": n_rows or 0}
    for row in check_rows(q, k, scale, bs, thr, n_rows):
        emit({**tag, **row})
    if q.is_cuda:
        torch.cuda.empty_cache()
    for variant, opts in SCORE_SETTINGS:
        if n_rows is not None and variant != "skew":
            continue
        ms, spread = timer(lambda: vs.vertical_slash_scores(
            q, k, scale, bs, variant=variant, n_rows=n_rows, **opts), args.reps)
        emit({"row": "scores", **tag, "variant": variant, **opts, "ms": ms,
              "spread_ms": spread})
    for variant in vs.VARIANTS:
        ms, spread = timer(lambda: vs.vertical_slash_flags(q, k, scale, bs, thr,
                                                           variant=variant, n_rows=n_rows),
                           args.reps)
        emit({"row": "flags", **tag, "variant": variant, "ms": ms, "spread_ms": spread})
    ms, _ = timer(lambda: vs.vertical_slash_flags(q, k, scale, bs, thr, kernel=False,
                                                  n_rows=n_rows), 3)
    emit({"row": "flags", **tag, "variant": "reference", "ms": ms})
    if args.op:
        for row in search_rows(q, k, scale, bs, n_rows, timer, args.reps):
            emit({**tag, **row})
        for row in op_rows(q, k, v, S, timer, args.reps, n_rows, args.op_threshold):
            emit(row)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-lens", default="32768,131072")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--threshold", type=float, default=0.015)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--device", default="cuda")
    p.add_argument("--op", action="store_true", help="also time the op with/without the stage")
    p.add_argument("--op-threshold", type=float, default=0.005,
                   help="vs_threshold of the default config's op rows")
    p.add_argument("--rows", default="0", help="probe rows per setting, 0: the last block")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    timer = cuda_time if cuda else wall_time
    rows = []

    def emit(row):
        print(json.dumps(row), flush=True)
        rows.append(row)

    for S in [int(s) for s in args.seq_lens.split(",")]:
        t0 = time.perf_counter()
        length_rows(args, S, timer, emit)
        if cuda:
            torch.cuda.empty_cache()
        print(json.dumps({"row": "seconds", "S": S, "s": time.perf_counter() - t0}), flush=True)
    if args.out:
        info = {"torch": torch.__version__, "device": args.device}
        if cuda:
            info["gpu"] = torch.cuda.get_device_name()
        with open(args.out, "w") as f:
            json.dump({**info, "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
