"""Plot FlashPrefill's kept blocks for a few heads of inputs with planted attention structure.

    python examples/plot_block_mask.py --seq-len 8192 --out block_masks/

Without ``--out`` the pictures go to a new temporary directory (printed), not the current one.

Each query head of ``planted_qkv`` plays one role (streaming, vertical lines, slash lines,
block retrieval), so the four pictures show the four shapes the pattern search must find.
Needs matplotlib (``pip install 'fp-compile[plot]'``).
"""

import argparse
import os
import tempfile

from fp_compile import FlashPrefillConfig, select_blocks
from fp_compile.demo.plotting import plot_selection
from fp_compile.demo.synthetic import planted_qkv

ROLES = ("streaming", "vertical", "slash", "retrieval")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--alpha", type=float, default=FlashPrefillConfig.alpha)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--out", help="directory for the PNGs (default: a new temporary directory)")
    args = p.parse_args(argv)

    q, k, _ = planted_qkv(1, 8, 2, args.seq_len, args.head_dim, seed=0)
    sel = select_blocks(q, k, config=FlashPrefillConfig(block_size=args.block_size,
                                                        alpha=args.alpha))
    out = args.out or tempfile.mkdtemp(prefix="fp_compile_block_masks_")
    os.makedirs(out, exist_ok=True)
    print(f"S={args.seq_len} block_size={args.block_size} alpha={args.alpha}: "
          f"density {sel.density:.3f} over all heads")
    mask = sel.to_block_mask()  # the same blocks as a FlexAttention BlockMask
    print(f"FlexAttention BlockMask {tuple(mask.shape)}: {mask.sparsity():.1f}% of all S x S blocks "
          "skipped (the upper triangle included)")
    for head, role in enumerate(ROLES):
        path = plot_selection(sel, 0, head, os.path.join(out, f"head{head}_{role}.png"),
                              title=f"head {head} ({role}), S={args.seq_len}, "
                                    f"alpha={args.alpha}")
        print(f"  wrote {path}")
    print(f"pictures in {os.path.abspath(out)}")


if __name__ == "__main__":
    main()
