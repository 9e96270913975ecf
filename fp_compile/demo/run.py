"""The ``python -m fp_compile demo`` and ``explain`` runs: build a model, compile it, report.

The argument parsing lives in ``fp_compile.cli``; the functions here take the parsed options
(an ``argparse.Namespace`` with the demo's fields) and an already validated FlashPrefillConfig.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time

import torch

from ..config import FlashPrefillConfig
from . import models as fm

# Defaults per device: small enough for a 2-core CPU, big enough on a GPU for real speedups.
DEMO_DEFAULTS = {
    "cpu": dict(seq_len=4096, layers=2, hidden=256, heads=4, kv_heads=2, intermediate=512,
                vocab=512, dtype="float32", reps=2),
    "cuda": dict(seq_len=32768, layers=4, hidden=4096, heads=32, kv_heads=8, intermediate=11008,
                 vocab=32000, dtype="bfloat16", reps=5),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Progress:
    """tqdm when installed, else one printed line per step."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc="demo", unit="step", file=sys.stderr,
                                bar_format="{desc}: {n}/{total} |{bar:20}| {elapsed} {postfix}")
            except ImportError:
                pass
        self.step = 0
        self.total = total

    def __call__(self, what: str) -> None:
        self.step += 1
        if self.bar is not None:
            self.bar.set_postfix_str(what)
            self.bar.update(1)
        elif self.enabled:
            print(f"[{self.step}/{self.total}] {what}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def build_model(args: argparse.Namespace, kind: str, device: str, dtype: torch.dtype, plant: bool):
    """(model, prefill function returning final hidden states (B, S, dim), description)."""
    margs = fm.ModelArgs(vocab_size=args.vocab, dim=args.hidden, n_layers=args.layers,
                         n_heads=args.heads, n_kv_heads=args.kv_heads,
                         intermediate_size=args.intermediate, max_seq_len=args.seq_len)
    if kind == "auto":
        kind = "hf" if importlib.util.find_spec("transformers") else "builtin"
    torch.manual_seed(args.seed)
    if kind == "hf":
        with torch.device(device):  # initialise in place: a GPU-sized model inits slowly on CPU
            model = fm.build_hf_llama(margs, "llama")
        body = model.model
        what = "Hugging Face LlamaForCausalLM (random init, attn_implementation='sdpa')"

        def prefill(ids):
            return body(input_ids=ids).last_hidden_state
    else:
        with torch.device(device):
            model = fm.Transformer(margs).eval()
        what = "fp_compile.demo.models.Transformer (random init, gpt-fast style)"

        def prefill(ids):
            return model.hidden(ids)
    if plant:  # in fp32, before the cast
        fm.plant_attention_structure(model, seed=args.seed)
        what += " + planted attention structure (sink, RoPE locality)"
    model.to(dtype=dtype).eval()
    return model, prefill, what


def capture_sdpa_inputs(fn, *inputs, index: int = 0):
    """q, k of the ``index``-th SDPA call ``fn(*inputs)`` makes, stopping the run right there."""

    class _Stop(Exception):
        pass

    captured = {}

    class Mode(torch.overrides.TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.nn.functional.scaled_dot_product_attention:
                if Mode.calls == index:
                    captured["q"], captured["k"] = args[0].detach(), args[1].detach()
                    raise _Stop
                Mode.calls += 1
            return func(*args, **kwargs)

    try:
        with Mode():
            fn(*inputs)
    except _Stop:
        pass
    if not captured:
        raise RuntimeError(f"the model made fewer than {index + 1} SDPA calls")
    return captured["q"], captured["k"]


def _timed(fn, ids, reps: int, device: str) -> tuple[float, float]:
    """Median and spread ((max - min) / 2) in ms of ``reps`` runs (after the caller's warm-up)."""
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(ids)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), (max(times) - min(times)) / 2


def run_demo(args: argparse.Namespace, config: FlashPrefillConfig) -> dict:
    """Compile the model ``args`` describe with ``make_backend(config)`` and with the dense
    baseline, run one prefill of ``args.seq_len`` tokens through each and print the comparison.
    ``args`` has every per-device default filled in. Returns the printed figures as a dict."""
    from ..backend import make_backend
    from ..explain import explain
    from ..stats import reset_stats, stats

    dtype = DTYPES[args.dtype]
    steps = 6 + bool(args.plot)
    progress = Progress(steps, enabled=not args.no_progress)
    model, prefill, what = build_model(args, args.model, args.device, dtype, not args.no_plant)
    progress("model built")
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(1, args.vocab, (1, args.seq_len), generator=gen)
    ids[:, 0] = 0  # the sink token (a BOS)
    ids = ids.to(args.device)
    print(f"model: {what}")
    print(f"  {args.layers} layers, hidden {args.hidden}, {args.heads} heads / {args.kv_heads} kv "
          f"heads, {args.dtype}, device {args.device}; prompt {args.seq_len} tokens")
    print(f"config: alpha={config.alpha} block_size={config.block_size} "
          f"min_seq_len={config.min_seq_len} dense_layers={config.dense_layers}")

    with torch.no_grad():
        reset_stats()
        report = explain(prefill, ids, config=config.replace(collect_stats=True))
        progress("explained (one eager run of the rewritten graph)")
        table = stats()
        torch._dynamo.reset()

        fast = torch.compile(prefill, backend=make_backend(config))
        y_fast = fast(ids)  # compile + warm-up
        progress("compiled with backend='flashprefill'")
        t_fast = _timed(fast, ids, args.reps, args.device)
        progress("timed flashprefill")

        dense = torch.compile(prefill) if args.dense == "inductor" else prefill
        y_dense = dense(ids)
        progress(f"{'compiled with default Inductor' if args.dense == 'inductor' else 'eager'}")
        t_dense = _timed(dense, ids, args.reps, args.device)
        progress("timed dense")
        if args.plot:
            from ..api import select_blocks
            from .plotting import plot_selection

            q, k = capture_sdpa_inputs(prefill, ids)
            sel = select_blocks(q, k, config=config)
            plot_selection(sel, 0, 0, args.plot, title=f"layer 0, head 0: S={args.seq_len}, "
                           f"alpha={config.alpha}, density {sel.density:.3f}")
            progress(f"wrote {args.plot}")
    progress.close()

    yf, yd = y_fast.float(), y_dense.float()
    rel = ((yf - yd).norm() / yd.norm()).item()
    cos = torch.nn.functional.cosine_similarity(yf.flatten(1), yd.flatten(1)).mean().item()
    print()
    print(f"rewritten: {len(report.rewritten)} SDPA call(s); left dense: {len(report.skipped)}")
    for entry in report.skipped:
        print(f"  dense: {entry}")
    print()
    print("density per layer (kept causal blocks / all causal blocks, mean over heads):")
    for layer, d in table.by_layer().items():
        heads = next(r.head_density for r in table.rows if r.layer == layer)
        print(f"  layer {layer}: {d:.3f}   heads: " + " ".join(f"{h:.2f}" for h in heads))
    if not len(table):
        print("  (no sparse layer ran)")
    print()
    print(f"error vs dense: relative L2 of final hidden states {rel:.4f} (cosine {cos:.5f})")
    speedup = t_dense[0] / t_fast[0]
    print(f"prefill time: flashprefill {t_fast[0]:.1f} ms (+-{t_fast[1]:.1f}), "
          f"dense {args.dense} {t_dense[0]:.1f} ms (+-{t_dense[1]:.1f}): "
          f"{speedup:.2f}x, median of {args.reps}")
    if args.device == "cpu":
        print("(on CPU the op runs the plain-torch reference, not the Triton kernels: the speedup "
              "is measured on a GPU with --device cuda)")
    return dict(rewritten=len(report.rewritten), skipped=len(report.skipped),
                density=table.by_layer(), rel_err=rel, cos=cos, ms_flashprefill=t_fast[0],
                ms_dense=t_dense[0], speedup=speedup)


def explain_builtin(seq_len: int, layers: int, decode: bool, config: FlashPrefillConfig):
    """The RewriteReport of a tiny built-in model's prefill of ``seq_len`` tokens, or of one
    decode step after it (``decode=True``)."""
    from ..explain import explain

    margs = fm.ModelArgs(vocab_size=256, dim=64, n_layers=layers, n_heads=4, n_kv_heads=2,
                         intermediate_size=128, max_seq_len=seq_len + 1)
    torch.manual_seed(0)
    model = fm.Transformer(margs).eval()
    ids = torch.randint(0, margs.vocab_size, (1, seq_len))
    with torch.no_grad():
        if decode:
            model.setup_caches(1, seq_len + 1)
            model(ids)
            return explain(model, ids[:, :1], torch.tensor([seq_len]), config=config)
        return explain(model, ids, config=config)
