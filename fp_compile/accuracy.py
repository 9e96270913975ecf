"""Accuracy tools: attention recall of a block selection, sparse-vs-dense error, calibration.

Layouts: q (B, H, S, D); k, v (B, Hkv, S, D); a block mask ``keep`` (B, H, M, M) bool.
Everything works on chunks of query rows (or a chosen subset of rows), so no S x S tensor is
built; with ``rows`` given, the cost is O(len(rows) * S * D) per head, which makes long-S
measurements affordable on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .kernels import utils as ku
from .kernels.block_means import key_block_stats


def _rows_or_all(S: int, rows: torch.Tensor | None, device) -> torch.Tensor:
    if rows is None:
        return torch.arange(S, device=device)
    return torch.as_tensor(rows, device=device).long()


def _chunked(q, k, rows, extra_width=0):
    """Yield (row indices, exact causal logits (B, Hkv, G, r, S) in fp32) over chunks of rows."""
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    step = ku.rows_per_chunk(B, H, S + extra_width, 1)
    kf = k.to(ku.acc_dtype(k))
    for c0 in range(0, rows.numel(), step):
        r = rows[c0:c0 + step]
        qc = ku.group_view(q[:, :, r], Hkv).to(kf.dtype)
        yield r, qc, torch.matmul(qc, kf.unsqueeze(2).transpose(-1, -2))


def mask_recall(q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor, scale: float,
                block_size: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Share of exact causal softmax mass inside the kept blocks, per head: (B, H) fp32/fp64.

    Averaged over the query rows ``rows`` (default: all rows).
    """
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    rows = _rows_or_all(S, rows, q.device)
    keep_g = keep.unflatten(1, (Hkv, H // Hkv))
    cols = torch.arange(S, device=q.device)
    total = None
    for r, _, logits in _chunked(q, k, rows):
        logits = (scale * logits).masked_fill(cols[None, :] > r[:, None], float("-inf"))
        p = torch.softmax(logits, dim=-1)
        inside = keep_g[:, :, :, r // block_size][..., cols // block_size]
        mass = (p * inside).sum(dim=-1).sum(dim=-1)  # (B, Hkv, G)
        total = mass if total is None else total + mass
    return (total / rows.numel()).flatten(1, 2)


def sparse_and_dense_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                          scale: float, block_size: int, rows: torch.Tensor | None = None,
                          mean_correction: bool = False):
    """Outputs of block-sparse (as the reference computes it) and dense causal attention.

    Returns two (B, H, len(rows), D) tensors in fp32 (fp64 for fp64 inputs) for the query
    ``rows`` (default: all rows). Matches ``block_sparse_attention_reference`` row for row.
    """
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    M = ku.cdiv(S, block_size)
    rows = _rows_or_all(S, rows, q.device)
    keep_g = keep.unflatten(1, (Hkv, H // Hkv))
    vf = v.to(ku.acc_dtype(v))
    if mean_correction:
        kmean, vmean, counts = key_block_stats(k, v, block_size)
    cols = torch.arange(S, device=q.device)
    sparse, dense = [], []
    for r, qc, logits in _chunked(q, k, rows, M if mean_correction else 0):
        logits = (scale * logits).masked_fill(cols[None, :] > r[:, None], float("-inf"))
        dense.append(torch.matmul(torch.softmax(logits, dim=-1), vf.unsqueeze(2)))
        rb = r // block_size
        inside = keep_g[:, :, :, rb][..., cols // block_size]
        logits = logits.masked_fill(~inside, float("-inf"))
        if mean_correction:
            skipped = ~keep_g[:, :, :, rb] & (torch.arange(M, device=q.device)[None, :] < rb[:, None])
            pseudo = scale * torch.matmul(qc, kmean.unsqueeze(2).transpose(-1, -2))
            pseudo = (pseudo + counts.log()).masked_fill(~skipped, float("-inf"))
            p = torch.softmax(torch.cat([logits, pseudo], dim=-1), dim=-1)
            o = torch.matmul(p[..., :S], vf.unsqueeze(2)) + torch.matmul(p[..., S:], vmean.unsqueeze(2))
        else:
            o = torch.matmul(torch.softmax(logits, dim=-1), vf.unsqueeze(2))
        sparse.append(o)
    return torch.cat(sparse, dim=-2).flatten(1, 2), torch.cat(dense, dim=-2).flatten(1, 2)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over the whole tensor."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def sample_rows(S: int, n: int, seed: int = 0, device="cpu") -> torch.Tensor:
    """``n`` distinct query rows drawn uniformly from the second half of [0, S), sorted.

    Long-range sparsity only matters for late rows; early rows are near-dense under any rule.
    """
    g = torch.Generator().manual_seed(seed)
    lo = S // 2
    n = min(n, S - lo)
    return (lo + torch.randperm(S - lo, generator=g)[:n]).sort().values.to(device)


# --------------------------------------------------------------------------------------------
# Calibration: alpha per layer from the recall of sample prompts.

DEFAULT_ALPHAS = (0.3, 0.25, 0.2, 0.18, 0.15, 0.12, 0.1, 0.08, 0.06, 0.04, 0.02, 0.0)


@dataclass
class LayerCalibration:
    layer: int
    alpha: float
    recall: float
    density: float
    seq_len: int
    met: bool  # False when even the smallest alpha on the grid missed the target


@dataclass
class CalibrationReport:
    """Per-layer choice of :func:`calibrate`; ``str()`` gives a table."""

    target_recall: float
    layers: list[LayerCalibration] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"calibration for recall >= {self.target_recall:g}",
                 f"{'layer':>5} {'seq_len':>8} {'alpha':>6} {'recall':>7} {'density':>8}"]
        for r in self.layers:
            flag = "" if r.met else "  (target missed)"
            lines.append(f"{r.layer:>5} {r.seq_len:>8} {r.alpha:>6.3g} {r.recall:>7.4f} "
                         f"{r.density:>8.4f}{flag}")
        return "\n".join(lines)

    def as_dicts(self) -> list[dict]:
        return [dict(vars(r)) for r in self.layers]


def calibrate(model, sample_inputs, target_recall: float = 0.95,
              alphas: tuple[float, ...] = DEFAULT_ALPHAS, config=None,
              max_rows: int | None = 1024):
    """Pick alpha per layer: the largest alpha on the grid whose recall meets the target.

    Runs ``model`` on each of ``sample_inputs`` (a tuple is unpacked as positional arguments)
    through the flashprefill pass itself (traced by dynamo as ``explain`` does, not compiled by
    Inductor), so the calls measured are exactly those the backend rewrites (causal-mask folds
    included), numbered as the pass numbers layers (``FlashPrefillConfig.layer_alpha``). The
    rewritten calls run dense while calibrating, so every layer sees exact activations. Recall is
    averaged over samples, heads and up to ``max_rows`` query rows drawn from the second half of
    each prompt (None: all rows). Layers where no alpha meets the target get the smallest alpha
    on the grid. Returns ``(config with layer_alpha, CalibrationReport)``.
    """
    from . import dispatch
    from .config import FlashPrefillConfig
    from .passes.sdpa_rewrite import rewrite_sdpa

    base = config or FlashPrefillConfig()
    grid = sorted({float(a) for a in alphas}, reverse=True)
    sums: dict[int, list] = {}

    def on_call(layer, q, k, scale, _config):
        S = q.shape[2]
        rows = None if max_rows is None or S <= max_rows else sample_rows(S, max_rows, 0, q.device)
        acc = sums.setdefault(layer, [[0.0, 0.0] for _ in grid] + [0, S])
        for n, a in enumerate(grid):
            keep = dispatch.select_mask(q, k, scale, base.replace(alpha=a))
            M = keep.shape[-1]
            acc[n][0] += float(mask_recall(q, k, keep, scale, base.block_size, rows).mean())
            acc[n][1] += float(keep.sum()) / (keep.shape[0] * keep.shape[1] * ku.causal_blocks(M))
        acc[-2] += 1

    # every layer rewritten (none left dense by the config) and run dense: exact activations
    probe = base.replace(dense_layers=(), layer_alpha=(), min_seq_len=2 ** 62,
                         collect_stats=False)

    def backend(gm, example_inputs):
        rewrite_sdpa(gm, probe)
        return gm.forward

    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    compiled = torch.compile(model, backend=backend)
    try:
        with torch.no_grad(), dispatch.observe(on_call):
            for inp in sample_inputs:
                compiled(*inp) if isinstance(inp, tuple) else compiled(inp)
    finally:
        if was_training:
            model.train()

    report = CalibrationReport(target_recall)
    overrides = []
    for layer in sorted(sums):
        acc = sums[layer]
        count, S = acc[-2], acc[-1]
        choice = None
        for n, a in enumerate(grid):
            recall, density = acc[n][0] / count, acc[n][1] / count
            if recall >= target_recall:
                choice = LayerCalibration(layer, a, recall, density, S, True)
                break
        if choice is None:
            n = len(grid) - 1
            choice = LayerCalibration(layer, grid[n], acc[n][0] / count, acc[n][1] / count, S,
                                      False)
        report.layers.append(choice)
        overrides.append((layer, choice.alpha))
    return base.replace(layer_alpha=tuple(overrides)), report
