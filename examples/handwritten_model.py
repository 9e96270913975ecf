"""A hand-written gpt-fast-style model under ``torch.compile(backend="flashprefill")``.

    python examples/handwritten_model.py --seq-len 2048

The prefill's SDPA calls (``is_causal=True, enable_gqa=True``) become FlashPrefill ops; the
decode steps (one query against the KV cache, with a mask) are left alone. With ``--alpha 0``
every causal block is kept and the generated tokens equal eager's.
"""

import argparse

import torch
from torch._dynamo.utils import counters

import fp_compile
from fp_compile.demo.models import ModelArgs, Transformer, generate, plant_attention_structure


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--block-size", type=int, default=64)
    # The config's default, so the example shows sparse attention; --alpha 0 keeps every
    # causal block and checks the result against eager.
    p.add_argument("--alpha", type=float, default=fp_compile.FlashPrefillConfig.alpha)
    args = p.parse_args(argv)

    margs = ModelArgs(vocab_size=512, dim=args.hidden, n_layers=args.layers, n_heads=4,
                      n_kv_heads=2, intermediate_size=2 * args.hidden,
                      max_seq_len=args.seq_len + args.new_tokens)
    torch.manual_seed(0)
    model = plant_attention_structure(Transformer(margs).eval())
    prompt = torch.randint(1, margs.vocab_size, (1, args.seq_len))
    prompt[:, 0] = 0

    options = {"alpha": args.alpha, "block_size": args.block_size, "min_seq_len": 0,
               "collect_stats": True}
    compiled = torch.compile(model, backend="flashprefill", options=options)
    fp_compile.reset_stats()
    eager_tokens = generate(model, prompt, args.new_tokens)
    tokens = generate(model, prompt, args.new_tokens, forward=compiled)
    c = counters["flashprefill"]
    print(f"SDPA calls rewritten: {c['sdpa_rewritten']}, left dense: {c['sdpa_skipped']} "
          f"(the decode graph's masked calls)")
    print(fp_compile.stats())
    same = torch.equal(tokens, eager_tokens)
    print(f"generated {tokens[0, args.seq_len:].tolist()}; eager {eager_tokens[0, args.seq_len:].tolist()}: "
          f"{'same' if same else 'different'}")
    if args.alpha == 0.0 and not same:
        raise SystemExit("alpha=0 must reproduce eager's tokens")


if __name__ == "__main__":
    main()
