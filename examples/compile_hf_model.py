"""Compile a Hugging Face model with the flashprefill backend (random init: nothing downloaded).

    python examples/compile_hf_model.py --family qwen2 --seq-len 4096

Works the same on a pretrained model: load it with ``attn_implementation="sdpa"``, then
``model.forward = torch.compile(model.forward, backend="flashprefill")`` and call ``generate()``.
Prefill attention (``is_causal=True``, no mask) is rewritten in every layer; decode steps and
padded batches (an explicit mask) stay on SDPA.
"""

import argparse

import torch
from torch._dynamo.utils import counters

import fp_compile
from fp_compile.demo.models import ModelArgs, build_hf_llama


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=["llama", "qwen2", "mistral"], default="llama")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--block-size", type=int, default=64)
    # The config's default, so the example shows sparse attention; --alpha 0 keeps every
    # causal block and checks the result against eager.
    p.add_argument("--alpha", type=float, default=fp_compile.FlashPrefillConfig.alpha)
    args = p.parse_args(argv)

    margs = ModelArgs(vocab_size=256, dim=args.hidden, n_layers=args.layers, n_heads=4,
                      n_kv_heads=2, intermediate_size=2 * args.hidden,
                      max_seq_len=args.seq_len + args.new_tokens)
    torch.manual_seed(0)
    model = build_hf_llama(margs, args.family)
    ids = torch.randint(1, margs.vocab_size, (1, args.seq_len))
    config = fp_compile.FlashPrefillConfig(alpha=args.alpha, block_size=args.block_size,
                                           min_seq_len=0)

    with torch.no_grad():
        print(fp_compile.explain(model, ids, config=config))
        torch._dynamo.reset()
        counters["flashprefill"].clear()  # count the compiled runs below only
        want = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)
        model.forward = torch.compile(model.forward, backend="flashprefill",
                                      options={"alpha": args.alpha,
                                               "block_size": args.block_size, "min_seq_len": 0})
        got = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)
    c = counters["flashprefill"]
    print(f"{args.family}: SDPA calls rewritten {c['sdpa_rewritten']} (prefill), "
          f"left dense {c['sdpa_skipped']} (decode steps)")
    print(f"new tokens {got[0, args.seq_len:].tolist()}, eager {want[0, args.seq_len:].tolist()}")
    if args.alpha == 0.0 and not torch.equal(got, want):
        raise SystemExit("alpha=0 must reproduce eager's tokens")


if __name__ == "__main__":
    main()
