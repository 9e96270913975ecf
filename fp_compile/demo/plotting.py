"""Pictures of FlashPrefill's block selection (needs matplotlib: ``pip install fp-compile[plot]``)."""

from __future__ import annotations

import os

from ..api import BlockSelection


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "fp_compile.demo.plotting needs matplotlib; install it with "
            "`pip install 'fp-compile[plot]'` (or `pip install matplotlib`)") from e
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_selection(selection: BlockSelection, batch: int = 0, head: int = 0,
                   path: str | os.PathLike = "block_mask.png", *, title: str | None = None) -> str:
    """Save a PNG heat map of the kept key blocks (columns) per query block (rows) of one head.

    Three colours: blocks above the diagonal (never computed), causal blocks skipped, and kept
    blocks. Returns the path written.
    """
    plt = _pyplot()
    from matplotlib.colors import ListedColormap

    B, H = selection.kv_num_blocks.shape[:2]
    if not (0 <= batch < B and 0 <= head < H):
        raise ValueError(f"plot_selection: batch {batch} / head {head} out of range for a "
                         f"selection of {B} batches and {H} heads")
    keep = selection.to_dense()[batch, head].cpu()
    M = keep.shape[-1]
    import torch

    causal = torch.ones(M, M, dtype=torch.bool).tril()
    image = causal.to(torch.int8) + keep.to(torch.int8)  # 0 future, 1 skipped, 2 kept
    kept = int(keep.sum())
    density = kept / (M * (M + 1) / 2)

    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=120)
    cmap = ListedColormap(["#ffffff", "#dfe6ee", "#1f4e9c"])
    ax.imshow(image.numpy(), cmap=cmap, vmin=0, vmax=2, interpolation="nearest")
    ax.set_xlabel(f"key block ({selection.block_size} tokens)")
    ax.set_ylabel("query block")
    ax.set_title(title or f"FlashPrefill kept blocks, batch {batch} head {head}\n"
                 f"S={selection.seq_len}, density {density:.3f} ({kept} of {M * (M + 1) // 2})",
                 fontsize=9)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="#1f4e9c", label="kept"),
                       Patch(color="#dfe6ee", label="skipped")],
              loc="upper right", fontsize=8)
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path)
    plt.close(fig)
    return path
