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
is not used: it loads a checkpoint (a random-init model has none; transformers 5.24 takes a
``state_dict`` instead, but then asks for ``accelerate``, which is no dependency here), and its
parallel-style classes changed between 5.17 (the GPU machine) and 5.24. The decoder-layer
entries of the plan are the same ``colwise`` / ``rowwise`` rules the built-in model uses.

The benchmark runs under torchrun, one process per GPU (NCCL) or per CPU process (gloo)::

    torchrun --nproc-per-node 2 -m fp_compile.demo.tp --device cuda \\
        --seq-len 131072 262144 524288 1048576 --dense-max 524288 --json tp.json
    torchrun --nproc-per-node 2 -m fp_compile.demo.tp --device cpu       # a small CPU check

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
    the prefill needs with the model resident. CPU runs report 0.
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
    peak = torch.cuda.max_memory_allocated() - held_bytes if cuda else 0
    return out, statistics.median(times), peak


def layer0_density(prefill, ids: torch.Tensor, config) -> float:
    """Kept share of causal blocks of this rank's heads in layer 0 (the selection alone)."""
    from ..api import select_blocks
    from .run import capture_sdpa_inputs

    q, k = capture_sdpa_inputs(prefill, ids)
    return select_blocks(q, k, config=config).density


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.1f}"


def _ms(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def table(rows: list[dict]) -> str:
    head = ("| S | dense TP ms | sparse TP ms | TP sparse vs dense | sparse 1 dev ms | "
            "TP vs 1 dev | peak GiB dense TP | peak GiB sparse TP | peak GiB 1 dev | "
            "density L0 | rel L2 vs dense TP | rel L2 vs 1 dev |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        def per_rank(key):
            v = r.get(key)
            return "-" if v is None else "/".join(_gib(x) for x in v)

        speed = (f"{r['dense_tp_ms'] / r['sparse_tp_ms']:.2f}x"
                 if r.get("dense_tp_ms") else "-")
        scale = (f"{r['single_ms'] / r['sparse_tp_ms']:.2f}x" if r.get("single_ms") else "-")
        lines.append(
            f"| {r['seq_len']} | {_ms(r.get('dense_tp_ms'))} | {_ms(r['sparse_tp_ms'])} | "
            f"{speed} | {_ms(r.get('single_ms'))} | {scale} | {per_rank('dense_tp_peak')} | "
            f"{per_rank('sparse_tp_peak')} | "
            f"{'-' if r.get('single_peak') is None else _gib(r['single_peak'])} | "
            f"{r['density']:.3f} | "
            + ("-" if r.get("rel_vs_dense") is None else f"{r['rel_vs_dense']:.4f}") + " | "
            + ("-" if r.get("rel_vs_single") is None else f"{r['rel_vs_single']:.2e}") + " |")
    return "\n".join(lines)


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
    weights = sum(_local(t).numel() * t.element_size() for t in
                  list(model.parameters()) + list(model.buffers()))
    tp_prefill = prefill_of(model)
    dense_tp = torch.compile(tp_prefill, backend="inductor", dynamic=True)
    sparse_tp = torch.compile(tp_prefill, backend=make_backend(config), dynamic=True)
    sparse_one = (torch.compile(prefill_of(single), backend=make_backend(config), dynamic=True)
                  if single is not None else None)
    if rank == 0:
        what = "Hugging Face LlamaForCausalLM" if args.hf else "built-in Transformer"
        name = torch.cuda.get_device_name(dev) if args.device == "cuda" else "CPU"
        print(f"{what}: {args.layers} layers, hidden {args.hidden}, {args.heads} heads / "
              f"{args.kv_heads} kv heads, MLP {args.intermediate}, {args.dtype}"
              f"{'' if args.no_plant else ', planted attention structure'}; "
              f"TP over {world} x {name} ({'nccl' if args.device == 'cuda' else 'gloo'}); "
              f"{args.heads // world} heads per rank; torch {torch.__version__}", flush=True)
        print(f"config: alpha={config.alpha} block_size={config.block_size} "
              f"min_seq_len={config.min_seq_len} (defaults otherwise); median of {args.reps}; "
              f"weights per rank {_gib(weights)} GiB", flush=True)
    rows = []
    with torch.no_grad():
        for S in args.seq_len:
            gen = torch.Generator().manual_seed(args.seed + S)
            ids = torch.randint(1, args.vocab, (1, S), generator=gen)
            ids[:, 0] = 0
            ids = ids.to(dev)
            row: dict = {"seq_len": S}
            y_dense = None
            if S <= args.dense_max:
                y_dense, ms, peak = measure(dense_tp, ids, args.reps, 0, dist.barrier)
                row["dense_tp_ms"] = max(_all_gather(dist, ms))
                row["dense_tp_peak"] = _all_gather(dist, peak)
            held = 0 if y_dense is None else y_dense.numel() * y_dense.element_size()
            y_tp, ms, peak = measure(sparse_tp, ids, args.reps, held, dist.barrier)
            row["sparse_tp_ms"] = max(_all_gather(dist, ms))
            row["sparse_tp_peak"] = _all_gather(dist, peak)
            row["rel_vs_dense"] = None if y_dense is None else rel_l2(y_tp, y_dense)
            del y_dense
            density = layer0_density(tp_prefill, ids, config)
            row["density"] = statistics.mean(_all_gather(dist, density))
            if sparse_one is not None:
                held = y_tp.numel() * y_tp.element_size()
                y_one, ms, peak = measure(sparse_one, ids, args.reps, held)
                row.update(single_ms=ms, single_peak=peak, rel_vs_single=rel_l2(y_tp, y_one))
                del y_one
            del y_tp
            dist.barrier()
            rows.append(row)
            if rank == 0:
                print(f"S={S}: done at {time.perf_counter() - t_start:.0f} s", flush=True)
    if rank == 0:
        print()
        print(table(rows))
        print("\nms: prefill of the final hidden states (no LM head), the slowest rank's median;"
              " peak GiB: max_memory_allocated per rank (rank 0/rank 1/...), weights included, "
              "outputs kept for the checks excluded; density L0: layer 0's kept causal blocks "
              "(mean over ranks); rel L2: sparse TP's final hidden states against dense TP and "
              "against the same sparse model on one device")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "world": world, "torch": torch.__version__,
                           "rows": rows}, f, indent=1)
    dist.destroy_process_group()
    return 0


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _all_gather(dist, value) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


if __name__ == "__main__":
    sys.exit(main())
