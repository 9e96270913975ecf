"""``python -m fp_compile``: demo, bench, explain.

    python -m fp_compile demo                    # CPU: about a minute on 2 cores
    python -m fp_compile demo --device cuda      # GPU: 32K-token prefill of a 4-layer 4096-wide model
    python -m fp_compile explain --seq-len 256
    python -m fp_compile bench -- --out results/
    python -m fp_compile <command> -v ...        # log the pass's decisions (logger "fp_compile")
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from .config import FlashPrefillConfig
from .demo.run import DEMO_DEFAULTS, DTYPES as _DTYPES


def demo(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m fp_compile demo",
                                description="Compile a random-init Llama-style model with the "
                                            "flashprefill backend and compare one long prefill "
                                            "with the same model compiled densely.")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--intermediate", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--dtype", choices=sorted(_DTYPES))
    p.add_argument("--reps", type=int, help="timed runs per model")
    p.add_argument("--model", choices=["auto", "hf", "builtin"], default="auto",
                   help="auto: Hugging Face Llama when transformers is installed")
    p.add_argument("--alpha", type=float, default=FlashPrefillConfig.alpha)
    p.add_argument("--block-size", type=int, default=FlashPrefillConfig.block_size)
    p.add_argument("--dense-layers", type=int, nargs="*", default=[])
    p.add_argument("--dense", choices=["inductor", "eager"], default="inductor",
                   help="the baseline: the same model compiled by default Inductor, or eager")
    p.add_argument("--no-plant", action="store_true",
                   help="keep plain random weights (near-uniform attention: nothing to skip)")
    p.add_argument("--plot", help="write a PNG of layer 0 / head 0's kept blocks here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for key, value in DEMO_DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    config = FlashPrefillConfig(alpha=args.alpha, block_size=args.block_size,
                                min_seq_len=min(FlashPrefillConfig.min_seq_len, args.seq_len),
                                dense_layers=tuple(args.dense_layers))
    from .demo.run import run_demo

    return run_demo(args, config)


def explain_cmd(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fp_compile explain",
                                description="Print which SDPA calls of the built-in model the "
                                            "flashprefill pass rewrites, and why not the others.")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--decode", action="store_true",
                   help="explain a one-token decode step against a KV cache instead")
    p.add_argument("--alpha", type=float, default=FlashPrefillConfig.alpha)
    p.add_argument("--dense-layers", type=int, nargs="*", default=[])
    args = p.parse_args(argv)
    from .demo.run import explain_builtin

    config = FlashPrefillConfig(alpha=args.alpha, block_size=16, min_seq_len=0,
                                dense_layers=tuple(args.dense_layers))
    report = explain_builtin(args.seq_len, args.layers, args.decode, config)
    print(report)
    print(f"\nrewritten {len(report.rewritten)}, left dense {len(report.skipped)}")


def bench(argv: list[str] | None = None) -> None:
    # Imported, not loaded from benchmarks/ by path: the benchmark ships with the package.
    from .demo.bench import main as bench_main

    bench_main(argv, prog="python -m fp_compile bench")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"demo": demo, "bench": bench, "explain": explain_cmd}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__.strip())
        print(f"\ncommands: {', '.join(commands)}; `python -m fp_compile <command> --help` for options")
        sys.exit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    command, rest = argv[0], argv[1:]
    if rest[:1] == ["-v"]:  # decisions of the pass and the op, from the "fp_compile" logger
        logging.basicConfig(format="%(name)s %(levelname)s: %(message)s")
        logging.getLogger("fp_compile").setLevel(logging.DEBUG)
        rest = rest[1:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    commands[command](rest)
