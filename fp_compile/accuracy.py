"""Accuracy tools: attention recall of a block selection, sparse-vs-dense error, calibration.

Layouts: q (B, H, S, D); k, v (B, Hkv, S, D); a block mask ``keep`` (B, H, M, M) bool.
Everything works on chunks of query rows (or a chosen subset of rows), so no S x S tensor is
built; with ``rows`` given, the cost is O(len(rows) * S * D) per head, which makes long-S
measurements affordable on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .kernels import reference as ref


def _rows_or_all(S: int, rows: torch.Tensor | None, device) -> torch.Tensor:
    if rows is None:
        return torch.arange(S, device=device)
    return torch.as_tensor(rows, device=device).long()


def _chunked(q, k, rows, extra_width=0):
    """Yield (row indices, exact causal logits (B, Hkv, G, r, S) in fp32) over chunks of rows."""
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    step = ref._rows_per_chunk(B, H, S + extra_width, 1)
    kf = k.to(ref.acc_dtype(k))
    for c0 in range(0, rows.numel(), step):
        r = rows[c0:c0 + step]
        qc = ref._group_view(q[:, :, r], Hkv).to(kf.dtype)
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
    M = ref.cdiv(S, block_size)
    rows = _rows_or_all(S, rows, q.device)
    keep_g = keep.unflatten(1, (Hkv, H // Hkv))
    vf = v.to(ref.acc_dtype(v))
    if mean_correction:
        kmean, vmean, counts = ref.key_block_stats(k, v, block_size)
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


class _CaptureCausalSDPA(TorchFunctionMode):
    """Calls ``on_call(index, q, k, scale)`` for each causal prefill SDPA call, in call order."""

    def __init__(self, on_call):
        super().__init__()
        self.on_call = on_call
        self.index = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            out = func(*args, **kwargs)
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
                     "enable_gqa")
            bound = dict(zip(names, args))
            bound.update(kwargs)
            q, k = bound["query"], bound["key"]
            if (bound.get("is_causal", False) and bound.get("attn_mask") is None
                    and q.dim() == 4 and q.shape[-2] == k.shape[-2]):
                with torch.no_grad():
                    self.on_call(self.index, q.detach(), k.detach(), bound.get("scale"))
            self.index += 1  # every SDPA call counts, as the pass numbers layers
            return out
        return func(*args, **kwargs)


def calibrate(model, sample_inputs, target_recall: float = 0.95,
              alphas: tuple[float, ...] = DEFAULT_ALPHAS, config=None,
              max_rows: int | None = 1024):
    """Pick alpha per layer: the largest alpha on the grid whose recall meets the target.

    Runs ``model`` eagerly on each of ``sample_inputs`` (a tuple is unpacked as positional
    arguments), capturing every causal prefill ``F.scaled_dot_product_attention`` call; layer n
    is the n-th SDPA call of a forward pass, the numbering ``FlashPrefillConfig.layer_alpha``
    uses. Recall is averaged over samples, heads and up to ``max_rows`` query rows drawn from the
    second half of each prompt (None: all rows). Layers where no alpha meets the target get the
    smallest alpha on the grid. Returns ``(config with layer_alpha, CalibrationReport)``.
    """
    from .config import FlashPrefillConfig

    base = config or FlashPrefillConfig()
    grid = sorted({float(a) for a in alphas}, reverse=True)
    sums: dict[int, list] = {}

    def on_call(index, q, k, scale):
        Hkv = k.shape[1]
        if q.shape[1] % Hkv:
            return
        scale = ref.default_scale(q.shape[-1], scale)
        S = q.shape[2]
        rows = None if max_rows is None or S <= max_rows else sample_rows(S, max_rows, 0, q.device)
        acc = sums.setdefault(index, [[0.0, 0.0] for _ in grid] + [0, S])
        for n, a in enumerate(grid):
            keep = ref.select_mask_reference(
                q, k, scale, base.block_size, a, base.sink_blocks, base.window_blocks,
                base.last_dense_blocks, base.gqa_shared, base.vertical_slash, base.vs_threshold)
            M = keep.shape[-1]
            acc[n][0] += float(mask_recall(q, k, keep, scale, base.block_size, rows).mean())
            acc[n][1] += float(keep.sum()) / (keep.shape[0] * keep.shape[1] * M * (M + 1) / 2)
        acc[-2] += 1

    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.no_grad(), _CaptureCausalSDPA(on_call) as mode:
            for inp in sample_inputs:
                mode.index = 0  # layers are numbered per forward pass
                model(*inp) if isinstance(inp, tuple) else model(inp)
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
