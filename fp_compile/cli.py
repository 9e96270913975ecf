"""python -m fp_compile: demo, explain, bench.

    python -m fp_compile demo                    # CPU: about a minute on 2 cores
    python -m fp_compile demo --device cuda      # GPU: 32K-token prefill, 4 layers, 4096 wide
    python -m fp_compile explain --seq-len 256
    python -m fp_compile bench --out results/    # GPU; bench --help lists its options
    python -m fp_compile -v <command> ...        # log the pass's decisions (logger "fp_compile")
"""

from __future__ import annotations

import argparse
import functools
import logging
import re
import sys

import torch

from .config import FlashPrefillConfig
from .demo.run import DEMO_DEFAULTS, DTYPES

COMMANDS = ("demo", "explain", "bench")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help, and the descriptions' example lines kept as written.
    Defaults of None (filled in per device later) and of flags (False) say nothing: left out."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def _int_at_least(minimum: int):
    """An argparse type: an int >= ``minimum``; argparse names the option in the error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _config(parser: argparse.ArgumentParser, options: dict[str, str],
            **fields) -> FlashPrefillConfig:
    """FlashPrefillConfig(**fields), its ValueError (which names the field) turned into a usage
    error naming the command-line option the field came from (``options``: field -> option)."""
    try:
        return FlashPrefillConfig(**fields)
    except ValueError as e:
        match = re.match(r"FlashPrefillConfig\.(\w+)\s*", str(e))
        if match is None:
            parser.error(str(e))
        field = match.group(1)
        option = options.get(field, "--" + field.replace("_", "-"))
        parser.error(f"{option}: {str(e)[match.end():]}")


def _add_verbose(parser: argparse.ArgumentParser, default) -> None:
    # On the main parser and on each command's, so that -v works before or after the command;
    # the commands' default is SUPPRESS so that they do not overwrite a -v given before them.
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="log the pass's and the op's decisions (logger 'fp_compile')")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", formatter_class=_HelpFormatter,
                       help="compile a random-init model with the backend, compare with dense",
                       description="Compile a random-init Llama-style model with the "
                                   "flashprefill backend and compare one long prefill with the "
                                   "same model compiled densely. Model sizes left out take the "
                                   "device's defaults (fp_compile.demo.run.DEMO_DEFAULTS).")
    _add_verbose(p, argparse.SUPPRESS)

    def size(what: str, key: str) -> str:
        # The default depends on --device, so ArgumentDefaultsHelpFormatter cannot show it.
        per_device = ", ".join(f"{d[key]} on {device}" for device, d in DEMO_DEFAULTS.items())
        return f"{what} (default: {per_device})"

    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run")
    p.add_argument("--seq-len", type=_int_at_least(2), help=size("prompt tokens", "seq_len"))
    p.add_argument("--layers", type=_int_at_least(1), help=size("decoder layers", "layers"))
    p.add_argument("--hidden", type=_int_at_least(1), help=size("model width", "hidden"))
    p.add_argument("--heads", type=_int_at_least(1), help=size("query heads", "heads"))
    p.add_argument("--kv-heads", type=_int_at_least(1), help=size("key/value heads", "kv_heads"))
    p.add_argument("--intermediate", type=_int_at_least(1),
                   help=size("MLP width", "intermediate"))
    p.add_argument("--vocab", type=_int_at_least(2), help=size("vocabulary size", "vocab"))
    p.add_argument("--dtype", choices=sorted(DTYPES), help=size("model dtype", "dtype"))
    p.add_argument("--reps", type=_int_at_least(1), help=size("timed runs per model", "reps"))
    p.add_argument("--model", choices=["auto", "hf", "builtin", "trained"], default="auto",
                   help="auto: Hugging Face Llama when transformers is installed; trained: the "
                        "shipped long-context model answering one prompt of each synthetic task "
                        "with and without the pass (its own sizes: the size options are ignored; "
                        "--seq-len default 4096 on cpu, 32768 on cuda)")
    p.add_argument("--alpha", type=float, default=FlashPrefillConfig.alpha,
                   help="keep a key block when its score is >= alpha x the row's best")
    p.add_argument("--block-size", type=int, default=FlashPrefillConfig.block_size,
                   help="tokens per block (a power of two)")
    p.add_argument("--dense-layers", type=int, nargs="*", default=[],
                   help="SDPA-call indices that stay dense")
    p.add_argument("--dense", choices=["inductor", "eager"], default="inductor",
                   help="the baseline: the same model compiled by default Inductor, or eager")
    p.add_argument("--no-plant", action="store_true",
                   help="keep plain random weights (near-uniform attention: nothing to skip)")
    p.add_argument("--plot", help="write a PNG of layer 0 / head 0's kept blocks here")
    p.add_argument("--seed", type=int, default=0, help="weights and prompt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(run=functools.partial(_demo, p))


def _demo(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.model == "trained":
        return _demo_trained(p, args)
    for key, value in DEMO_DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    # The model's own checks, as usage errors naming the options instead of a traceback.
    if args.heads % args.kv_heads:
        p.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    if args.hidden % args.heads or (args.hidden // args.heads) % 2:
        p.error(f"--hidden ({args.hidden}) / --heads ({args.heads}) must be an even integer "
                "(the head dimension, split in halves by the rotary embedding)")
    config = _config(p, {"min_seq_len": "--seq-len"}, alpha=args.alpha,
                     block_size=args.block_size, dense_layers=tuple(args.dense_layers),
                     min_seq_len=min(FlashPrefillConfig.min_seq_len, args.seq_len))
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    from .demo.run import run_demo

    run_demo(args, config)


def _demo_trained(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from .demo.trained import DEMO_SEQ_LEN, run_demo

    args.seq_len = args.seq_len or DEMO_SEQ_LEN[args.device]
    config = _config(p, {"min_seq_len": "--seq-len"}, alpha=args.alpha,
                     block_size=args.block_size, dense_layers=tuple(args.dense_layers),
                     min_seq_len=min(FlashPrefillConfig.min_seq_len, args.seq_len))
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    try:
        run_demo(args, config)
    except FileNotFoundError as e:
        p.exit(1, f"{p.prog}: {e}\n")


def _add_explain(sub) -> None:
    p = sub.add_parser("explain", formatter_class=_HelpFormatter,
                       help="which SDPA calls of a tiny model the pass rewrites, and why not",
                       description="Print which SDPA calls of the built-in model the "
                                   "flashprefill pass rewrites, and why not the others.")
    _add_verbose(p, argparse.SUPPRESS)
    # One token is a decode step, which the built-in model runs only against a KV cache.
    p.add_argument("--seq-len", type=_int_at_least(2), default=256, help="prompt tokens")
    p.add_argument("--layers", type=_int_at_least(1), default=2, help="decoder layers")
    p.add_argument("--decode", action="store_true",
                   help="explain a one-token decode step against a KV cache instead")
    p.add_argument("--alpha", type=float, default=FlashPrefillConfig.alpha,
                   help="keep a key block when its score is >= alpha x the row's best")
    p.add_argument("--dense-layers", type=int, nargs="*", default=[],
                   help="SDPA-call indices that stay dense")
    p.set_defaults(run=functools.partial(_explain, p))


def _explain(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    config = _config(p, {}, alpha=args.alpha, block_size=16, min_seq_len=0,
                     dense_layers=tuple(args.dense_layers))
    from .demo.run import explain_builtin

    report = explain_builtin(args.seq_len, args.layers, args.decode, config)
    print(report)
    print(f"\nrewritten {len(report.rewritten)}, left dense {len(report.skipped)}")


def _add_bench(sub) -> None:
    # Listed for the help only: main() hands everything after "bench" to the benchmark's own
    # parser, which owns its options (bench --help lists them).
    p = sub.add_parser("bench", add_help=False,
                       help="the kernel benchmark (GPU); its options: bench --help")
    p.add_argument("bench_args", nargs=argparse.REMAINDER)


def _bench(argv: list[str]) -> None:
    from .demo.bench import main as bench_main

    bench_main(argv, prog="python -m fp_compile bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fp_compile", description=__doc__,
                                     formatter_class=_HelpFormatter)
    _add_verbose(parser, False)
    sub = parser.add_subparsers(title="commands", dest="command", metavar="command")
    _add_demo(sub)
    _add_explain(sub)
    _add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # The main parser's options are flags only, so the first word that is not one is the command.
    at = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if at is None:
        if not argv or any(a in ("-h", "--help") for a in argv):
            parser.print_help()
            parser.exit(0)
        parser.error(f"no command given (choose from {', '.join(COMMANDS)})")
    if argv[at] not in COMMANDS:
        parser.error(f"unknown command {argv[at]!r} (choose from {', '.join(COMMANDS)})")
    if argv[at] == "bench":
        args = parser.parse_args(argv[:at + 1])
        rest = argv[at + 1:]
        if rest[:1] in (["-v"], ["--verbose"]):
            args.verbose, rest = True, rest[1:]
        if rest[:1] == ["--"]:
            rest = rest[1:]
        run = functools.partial(_bench, rest)
    else:
        args = parser.parse_args(argv)
        run = functools.partial(args.run, args)
    if args.verbose:
        logging.basicConfig(format="%(name)s %(levelname)s: %(message)s")
        logging.getLogger("fp_compile").setLevel(logging.DEBUG)
    run()
