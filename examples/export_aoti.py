"""torch.export + apply_flashprefill + AOTInductor: a FlashPrefill model as a deployable package.

    python examples/export_aoti.py --seq-len 1024 --out flashprefill_model.pt2

Exports the built-in model's prefill with a dynamic sequence length, rewrites its SDPA calls
into ``torch.ops.fp_compile.flash_prefill`` (``apply_flashprefill``), compiles it ahead of time
with AOTInductor, loads the package back and checks it against eager for two prompt lengths.
The package needs ``import fp_compile`` at load time (the op's registration).
"""

import argparse
import os
import tempfile

import torch

import fp_compile
from fp_compile.export import apply_flashprefill
from fp_compile.demo.models import ModelArgs, Transformer, plant_attention_structure


class Prefill(torch.nn.Module):
    """The model's prefill: token ids (1, S) -> final hidden states (1, S, dim)."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.hidden(ids)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--block-size", type=int, default=64)
    # The config's default, so the example shows sparse attention; --alpha 0 keeps every
    # causal block and checks the result against eager.
    p.add_argument("--alpha", type=float, default=fp_compile.FlashPrefillConfig.alpha)
    p.add_argument("--out", help="package path (default: a temporary file)")
    args = p.parse_args(argv)

    margs = ModelArgs(vocab_size=256, dim=args.hidden, n_layers=args.layers, n_heads=4,
                      n_kv_heads=2, intermediate_size=2 * args.hidden,
                      max_seq_len=2 * args.seq_len)
    torch.manual_seed(0)
    model = Prefill(plant_attention_structure(Transformer(margs).eval())).eval()
    ids = torch.randint(1, margs.vocab_size, (1, args.seq_len))
    config = fp_compile.FlashPrefillConfig(alpha=args.alpha, block_size=args.block_size,
                                           min_seq_len=0)

    seq = torch.export.Dim("seq", min=16, max=2 * args.seq_len)
    with torch.no_grad():
        ep = torch.export.export(model, (ids,), dynamic_shapes={"ids": {1: seq}})
        ep = apply_flashprefill(ep, config)
    n_ops = sum(1 for n in ep.graph.nodes if "flash_prefill" in str(n.target))
    n_sdpa = sum(1 for n in ep.graph.nodes if "scaled_dot_product" in str(n.target))
    print(f"exported graph: {n_ops} flash_prefill op(s), {n_sdpa} SDPA call(s) left")
    if n_ops != args.layers:
        raise SystemExit(f"expected {args.layers} flash_prefill ops, found {n_ops}")

    path = args.out or os.path.join(tempfile.mkdtemp(), "flashprefill_model.pt2")
    path = torch._inductor.aoti_compile_and_package(ep, package_path=path)
    runner = torch._inductor.aoti_load_package(path)
    print(f"AOTInductor package: {path}")
    with torch.no_grad():
        for S in (args.seq_len, args.seq_len // 2 + 3):   # one package, two prompt lengths
            x = ids[:, :S]
            got, want = runner(x), model(x)
            err = ((got - want).norm() / want.norm()).item()
            print(f"  S={S}: relative error vs dense eager {err:.2e} (alpha={args.alpha})")
            if args.alpha == 0.0 and err > 1e-4:
                raise SystemExit("alpha=0 keeps every block: the package must match eager")


if __name__ == "__main__":
    main()
