"""Tensor parallelism for the demo models: shard by heads, compile with the flashprefill backend.

``shard_model(model, mesh)`` shards every decoder layer of the built-in ``Transformer`` (or of a
Hugging Face Llama-family model) with ``torch.distributed.tensor.parallel.parallelize_module``:
the q/k/v, gate and up projections column-wise, o_proj and down_proj row-wise. Each rank then
holds ``n_heads / world`` query heads and ``n_kv_heads / world`` kv heads, its SDPA call sees
only those heads (plain local tensors), and the flashprefill backend rewrites it into the sparse
op like any other: each rank selects and attends over its own heads, with no gather of q, k or
v. The only collectives are the two all-reduces per layer after o_proj and down_proj. Embedding,
norms and LM head stay replicated.

Hugging Face models are sharded by their own plan (``config.base_model_tp_plan``, e.g.
``layers.*.self_attn.q_proj: colwise``) applied with PyTorch's ``ColwiseParallel`` /
``RowwiseParallel`` styles. Transformers' own route, ``from_pretrained(..., tp_plan="auto")``,
is not used: it loads a checkpoint, which a random-init model does not have (transformers 5.24
takes a ``state_dict`` instead, but then asks for ``accelerate``, no dependency here), and the
internals behind it (``transformers.distributed``) move between releases, while the GPU machine
has 5.17 and this project tests 5.24. The decoder-layer entries of the plan are the same
``colwise`` / ``rowwise`` rules the built-in model uses; with ``--hf`` the benchmark checks
it on CPU (gloo), not on long GPU prompts.

The benchmark runs under torchrun, one process per GPU (NCCL) or per CPU process (gloo)::

    torchrun --standalone --nproc-per-node 2 -m fp_compile.demo.tp --device cuda \\
        --seq-len 131072 262144 524288 1048576 --dense-max 524288 --json tp.json
    torchrun --standalone --nproc-per-node 2 -m fp_compile.demo.tp --device cpu   # small, gloo

For each length: dense TP (the sharded model under ``backend="inductor"``), sparse TP (the
sharded model under ``make_backend(config)``) and, on rank 0 alone, sparse on one device (the
unsharded model under the same backend); prefill time (median of ``--reps``, CUDA events), peak
memory per device, layer 0's kept density, and the relative L2 of the final hidden states of
sparse TP against dense TP and against the single-device run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time

import torch
import torch.nn as nn

from . import models as fm

# The built-in Transformer's plan, per decoder layer (Block), in Hugging Face's style names.
BUILTIN_LAYER_PLAN = {
    "attention.q_proj": "colwise",
    "attention.k_proj": "colwise",
    "attention.v_proj": "colwise",
    "attention.o_proj": "rowwise",
    "gate_proj": "colwise",
    "up_proj": "colwise",
    "down_proj": "rowwise",
}


def _style(name: str):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    if name not in styles:
        raise ValueError(f"tensor-parallel style {name!r} is not supported here (only "
                         f"{sorted(styles)} for decoder layers)")
    return styles[name]()


def _hf_layer_plan(model: nn.Module) -> dict[str, str]:
    """The decoder-layer entries of a Hugging Face model's own TP plan, relative to one layer."""
    config = getattr(model, "config", None)
    plan = dict(getattr(config, "base_model_tp_plan", None) or {})
    layer_plan = {}
    for key, style in plan.items():
        match = re.fullmatch(r"(?:model\.)?layers\.\*\.(.+)", key)
        if match:       # embeddings, norms and the LM head stay replicated
            layer_plan[match.group(1)] = style
    if not layer_plan:
        raise ValueError(f"{type(model).__name__} has no tensor-parallel plan for its decoder "
                         "layers (config.base_model_tp_plan)")
    return layer_plan


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers of the built-in Transformer or a Hugging Face model."""
    if isinstance(model, fm.Transformer):
        return model.layers
    base = getattr(model, "model", model)
    if not isinstance(getattr(base, "layers", None), nn.ModuleList):
        raise TypeError(f"{type(model).__name__}: no decoder layers found (expected .layers or "
                        ".model.layers)")
    return base.layers


def tp_plan_for(model: nn.Module) -> dict:
    """``{submodule path within one decoder layer: ParallelStyle}`` for ``parallelize_module``."""
    names = BUILTIN_LAYER_PLAN if isinstance(model, fm.Transformer) else _hf_layer_plan(model)
    return {path: _style(style) for path, style in names.items()}


def _head_counts(model: nn.Module) -> tuple[int, int, int]:
    if isinstance(model, fm.Transformer):
        a = model.args
        return a.n_heads, a.n_kv_heads, a.intermediate_size
    c = model.config
    return c.num_attention_heads, c.num_key_value_heads, c.intermediate_size


def check_shardable(model: nn.Module, world: int) -> None:
    """ValueError unless heads, kv heads and the MLP width divide by ``world``."""
    heads, kv_heads, inter = _head_counts(model)
    for what, n in (("attention heads", heads), ("kv heads", kv_heads),
                    ("MLP intermediate size", inter)):
        if n % world:
            raise ValueError(f"tensor parallelism over {world} ranks needs {what} ({n}) to be a "
                             f"multiple of {world}")


def shard_model(model: nn.Module, mesh) -> nn.Module:
    """Shard ``model``'s decoder layers by heads over the 1-D device ``mesh``, in place.

    Every rank must hold the same weights before the call (same seed, or a broadcast). Returns
    ``model``; its projections' weights become DTensors, their outputs stay plain local tensors.
    """
    from torch.distributed.tensor.parallel import parallelize_module

    check_shardable(model, mesh.size())
    plan = tp_plan_for(model)
    for layer in decoder_layers(model):
        parallelize_module(layer, mesh, plan)
    return model


# ---------------------------------------------------------------------------------------------
# The benchmark (torchrun entry point)

DEFAULTS = {
    "cpu": dict(seq_len=[1024], dense_max=None, layers=2, hidden=256, heads=8, kv_heads=4,
                intermediate=512, vocab=512, dtype="float32", reps=2, block_size=64,
                min_seq_len=512),
    "cuda": dict(seq_len=[131072, 262144, 524288, 1048576], dense_max=524288, layers=2,
                 hidden=4096, heads=32, kv_heads=8, intermediate=11008, vocab=32000,
                 dtype="bfloat16", reps=3, block_size=128, min_seq_len=16384),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="torchrun --nproc-per-node N -m fp_compile.demo.tp",
        description="Prefill under tensor parallelism: dense TP vs sparse TP vs sparse on one "
                    "device. Options left out take the device's defaults "
                    "(fp_compile.demo.tp.DEFAULTS).")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if
                   torch.cuda.is_available() else "cpu")
    p.add_argument("--seq-len", type=int, nargs="+", help="prompt lengths")
    p.add_argument("--dense-max", type=int,
                   help="run dense TP only up to this length (default: cuda 524288, cpu all)")
    p.add_argument("--no-single", action="store_true",
                   help="skip the single-device sparse run on rank 0")
    p.add_argument("--hf", action="store_true",
                   help="a Hugging Face LlamaForCausalLM sharded by its own tp plan instead of "
                        "the built-in Transformer")
    for name in ("layers", "hidden", "heads", "kv-heads", "intermediate", "vocab", "reps",
                 "block-size", "min-seq-len"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--alpha", type=float, default=0.12)
    p.add_argument("--no-plant", action="store_true", help="no planted attention structure")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the figures to this file (rank 0)")
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dense_max is None:
        args.dense_max = max(args.seq_len)
    if args.reps < 1 or min(args.seq_len) < 2:
        p.error("--reps must be >= 1 and every --seq-len >= 2")
    if "RANK" not in os.environ:
        p.error("run under torchrun, e.g. torchrun --nproc-per-node 2 -m fp_compile.demo.tp")
    return args


def init_distributed(device: str):
    """(rank, world, torch.device, mesh): one process group (NCCL on cuda, gloo on cpu)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    # NVLink multicast (NVLS) stays off: on shared hosts it can take the GPUs out of service.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo")
    world = dist.get_world_size()
    return dist.get_rank(), world, dev, init_device_mesh(device, (world,))


def build(args: argparse.Namespace, device: torch.device, max_len: int) -> nn.Module:
    """The full model, same weights on every rank (same seed), planted in fp32, then cast."""
    margs = fm.ModelArgs(vocab_size=args.vocab, dim=args.hidden, n_layers=args.layers,
                         n_heads=args.heads, n_kv_heads=args.kv_heads,
                         intermediate_size=args.intermediate, max_seq_len=max_len)
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = fm.build_hf_llama(margs) if args.hf else fm.Transformer(margs)
    if not args.no_plant:
        fm.plant_attention_structure(model, seed=args.seed)
    return model.to(dtype=DTYPES[args.dtype]).eval()


def prefill_of(model: nn.Module):
    """ids (B, S) -> final hidden states (B, S, dim)."""
    if isinstance(model, fm.Transformer):
        return model.hidden
    body = model.model
    return lambda ids: body(input_ids=ids, use_cache=False).last_hidden_state


def rel_l2(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 16) -> float:
    """||a - b|| / ||b|| in fp32, a chunk of positions at a time (no fp32 copy of the whole)."""
    num = den = 0.0
    for i in range(0, a.shape[1], chunk):
        x, y = a[:, i:i + chunk].float(), b[:, i:i + chunk].float()
        num += (x - y).pow(2).sum().item()
        den += y.pow(2).sum().item()
    return (num / den) ** 0.5


def measure(fn, ids: torch.Tensor, reps: int, held_bytes: int, barrier=None):
    """(output, median ms, peak bytes): one warm-up (and compile), then ``reps`` timed runs.

    The peak is the device's ``max_memory_allocated`` over warm-up and runs, less
    ``held_bytes`` (outputs of earlier runs that the caller keeps for its checks): the memory
    the prefill needs with the model resident. CPU runs report None.
    """
    cuda = ids.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    out = fn(ids)
    times = []
    for _ in range(reps):
        del out
        if barrier is not None:
            barrier()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            out = fn(ids)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            out = fn(ids)
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() - held_bytes if cuda else None
    return out, statistics.median(times), peak


def layer0_density(prefill, ids: torch.Tensor, config) -> float:
    """Kept share of causal blocks of this rank's heads in layer 0 (the selection alone)."""
    from ..api import select_blocks
    from .run import capture_sdpa_inputs

    q, k = capture_sdpa_inputs(prefill, ids)
    return select_blocks(q, k, config=config).density


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.1f}"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


TABLE_HEAD = ("| S | dense TP ms | sparse TP ms | sparse vs dense TP | sparse 1 dev ms | "
              "sparse TP vs 1 dev | peak GiB dense TP | peak GiB sparse TP | peak GiB 1 dev | "
              "density L0 | rel L2 vs dense TP | rel L2 vs 1 dev |")
TABLE_NOTE = (
    "ms: prefill to the final hidden states (no LM head), median of the runs, the slowest "
    "rank's; peak GiB: max_memory_allocated per device (rank 0/rank 1/...), weights included, "
    "outputs kept for the checks excluded; density L0: layer 0's kept share of causal blocks "
    "(the selection, mean over ranks; kv groups above dense_above still run dense); rel L2: "
    "sparse TP's final hidden states against dense TP's and against the unsharded model's "
    "under the same backend on one device")


def table_row(r: dict) -> str:
    """One markdown row of ``TABLE_HEAD`` from a result dict of ``main``."""
    def ratio(num, den):
        return "-" if num is None or den is None else f"{num / den:.2f}x"

    def peaks(v):   # None: not run; [None, ...]: not measured (CPU)
        return "-" if v is None or None in v else "/".join(_gib(x) for x in v)

    single_ms = r.get("single_ms")
    return (f"| {r['seq_len']} | {_fmt(r.get('dense_tp_ms'), '.1f')} | "
            f"{_fmt(r['sparse_tp_ms'], '.1f')} | "
            f"{ratio(r.get('dense_tp_ms'), r['sparse_tp_ms'])} | "
            f"{r.get('single_note') or _fmt(single_ms, '.1f')} | "
            f"{ratio(single_ms, r['sparse_tp_ms'])} | {peaks(r.get('dense_tp_peak'))} | "
            f"{peaks(r['sparse_tp_peak'])} | "
            f"{peaks([r['single_peak']] if 'single_peak' in r else None)} | "
            f"{r['density']:.3f} | {_fmt(r.get('rel_vs_dense'), '.4f')} | "
            f"{_fmt(r.get('rel_vs_single'), '.2e')} |")


def table(rows: list[dict]) -> str:
    return "\n".join([TABLE_HEAD, "|" + "---|" * (TABLE_HEAD.count("|") - 1)]
                     + [table_row(r) for r in rows])


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _all_gather(value) -> list:
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def run_length(S: int, args, dev, fns: dict, tp_prefill, config, barrier) -> dict:
    """Every variant at one prompt length: the figures of one table row."""
    gen = torch.Generator().manual_seed(args.seed + S)
    ids = torch.randint(1, args.vocab, (1, S), generator=gen)
    ids[:, 0] = 0        # the sink token (a BOS)
    ids = ids.to(dev)
    row: dict = {"seq_len": S}
    y_dense = None
    if S <= args.dense_max:
        y_dense, ms, peak = measure(fns["dense_tp"], ids, args.reps, 0, barrier)
        row.update(dense_tp_ms=max(_all_gather(ms)), dense_tp_peak=_all_gather(peak))
    held = 0 if y_dense is None else _nbytes(y_dense)
    y_tp, ms, peak = measure(fns["sparse_tp"], ids, args.reps, held, barrier)
    row.update(sparse_tp_ms=max(_all_gather(ms)), sparse_tp_peak=_all_gather(peak),
               rel_vs_dense=None if y_dense is None else rel_l2(y_tp, y_dense))
    del y_dense
    row["density"] = statistics.mean(_all_gather(layer0_density(tp_prefill, ids, config)))
    if fns.get("single") is not None:
        try:
            y_one, ms, peak = measure(fns["single"], ids, args.reps, _nbytes(y_tp))
            row.update(single_ms=ms, single_peak=peak, rel_vs_single=rel_l2(y_tp, y_one))
            del y_one
        except torch.OutOfMemoryError:
            row["single_note"] = "OOM"
            torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    import copy

    import torch.distributed as dist

    from ..backend import make_backend
    from ..config import FlashPrefillConfig

    args = parse_args(argv)
    rank, world, dev, mesh = init_distributed(args.device)
    if args.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    config = FlashPrefillConfig(alpha=args.alpha, block_size=args.block_size,
                                min_seq_len=args.min_seq_len)
    t_start = time.perf_counter()
    model = build(args, dev, max(args.seq_len))
    single = copy.deepcopy(model) if rank == 0 and not args.no_single else None
    shard_model(model, mesh)
    weights = sum(_nbytes(_local(t)) for t in list(model.parameters()) + list(model.buffers()))
    tp_prefill = prefill_of(model)
    backends = {"sparse_tp": make_backend(config), "single": make_backend(config)}
    # dynamic=True: one graph per variant serves every length (the op decides at run time)
    fns = {"dense_tp": torch.compile(tp_prefill, backend="inductor", dynamic=True),
           "sparse_tp": torch.compile(tp_prefill, backend=backends["sparse_tp"], dynamic=True),
           "single": None if single is None else torch.compile(
               prefill_of(single), backend=backends["single"], dynamic=True)}
    if rank == 0:
        what = "Hugging Face LlamaForCausalLM" if args.hf else "built-in Transformer"
        name = torch.cuda.get_device_name(dev) if args.device == "cuda" else "CPU"
        print(f"{what}: {args.layers} layers, hidden {args.hidden}, {args.heads} heads / "
              f"{args.kv_heads} kv heads, MLP {args.intermediate}, {args.dtype}"
              f"{'' if args.no_plant else ', planted attention structure'}; TP over {world} x "
              f"{name} ({dist.get_backend()}), {args.heads // world} heads per rank; "
              f"torch {torch.__version__}", flush=True)
        print(f"config: alpha={config.alpha} block_size={config.block_size} "
              f"min_seq_len={config.min_seq_len} (other fields default); {args.reps} timed runs "
              f"after one warm-up; weights per rank {_gib(weights)} GiB", flush=True)
        print(TABLE_HEAD + "\n|" + "---|" * (TABLE_HEAD.count("|") - 1), flush=True)
    rows = []
    with torch.no_grad():
        for S in args.seq_len:
            rows.append(run_length(S, args, dev, fns, tp_prefill, config, dist.barrier))
            dist.barrier()
            if rank == 0:
                print(table_row(rows[-1]) + f"  <- at {time.perf_counter() - t_start:.0f} s",
                      flush=True)
    reports = {k: b.last_report() for k, b in backends.items()}
    summaries = _all_gather({k: (r.summary(), sorted({e.q_shape for e in r.rewritten}, key=str))
                             for k, r in reports.items() if r is not None})
    if rank == 0:
        print()
        print(table(rows))
        print()
        print(TABLE_NOTE)
        for r, summary in enumerate(summaries):
            for variant, (line, shapes) in summary.items():
                print(f"rank {r} {variant}: {line}; op q shapes {', '.join(map(str, shapes))}")
        print(f"total {time.perf_counter() - t_start:.0f} s")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "world": world, "torch": torch.__version__,
                           "config": repr(config), "rows": rows, "reports": summaries}, f,
                          indent=1, default=str)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
