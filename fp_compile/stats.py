"""Per-layer, per-head density of every prefill, recorded when ``FlashPrefillConfig.collect_stats``.

The op records one row per call (one SDPA call of one prefill). With ``collect_stats=False`` (the
default) nothing here runs: the op never computes or stores anything extra.

    cfg = FlashPrefillConfig(collect_stats=True)
    model = torch.compile(model, backend="flashprefill", options={"collect_stats": True})
    model(prompt)
    print(fp_compile.stats())          # a table: prefill, layer, seq_len, density per head
    fp_compile.reset_stats()
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

log = logging.getLogger("fp_compile")

_lock = threading.Lock()
_rows: list["LayerStats"] = []
_prefill = {"index": 0, "seen": set()}


@dataclass(frozen=True)
class LayerStats:
    """One op call. ``head_density`` (H,) is kept causal blocks / all causal blocks, averaged
    over the batch; 1.0 everywhere when the call ran dense (``sparse=False``, S < min_seq_len)."""

    prefill: int
    layer: int
    seq_len: int
    batch: int
    block_size: int
    alpha: float
    sparse: bool
    head_density: tuple[float, ...]

    @property
    def density(self) -> float:
        return sum(self.head_density) / len(self.head_density)


class StatsTable:
    """Rows of ``LayerStats`` with a readable ``str`` (one line per prefill and layer)."""

    def __init__(self, rows: list[LayerStats]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def by_layer(self) -> dict[int, float]:
        """Mean density per layer over every recorded prefill."""
        sums: dict[int, list[float]] = {}
        for r in self.rows:
            sums.setdefault(r.layer, []).append(r.density)
        return {layer: sum(v) / len(v) for layer, v in sorted(sums.items())}

    def as_dicts(self) -> list[dict]:
        return [dict(prefill=r.prefill, layer=r.layer, seq_len=r.seq_len, batch=r.batch,
                     block_size=r.block_size, alpha=r.alpha, sparse=r.sparse,
                     density=r.density, head_density=list(r.head_density)) for r in self.rows]

    def __str__(self) -> str:
        if not self.rows:
            return "(no FlashPrefill stats recorded: set collect_stats=True)"
        lines = [f"{'prefill':>7} {'layer':>5} {'seq_len':>8} {'alpha':>6} {'mode':>6} "
                 f"{'density':>8}  per-head density"]
        for r in self.rows:
            heads = " ".join(f"{d:.2f}" for d in r.head_density)
            lines.append(f"{r.prefill:>7} {r.layer:>5} {r.seq_len:>8} {r.alpha:>6.3g} "
                         f"{'sparse' if r.sparse else 'dense':>6} {r.density:>8.3f}  {heads}")
        return "\n".join(lines)

    __repr__ = __str__


def stats() -> StatsTable:
    """Everything recorded since the last ``reset_stats()``."""
    with _lock:
        return StatsTable(list(_rows))


def reset_stats() -> None:
    with _lock:
        _rows.clear()
        _prefill["index"] = 0
        _prefill["seen"] = set()


def record(layer: int, seq_len: int, batch: int, block_size: int, alpha: float,
           kv_num_blocks: torch.Tensor | None, num_heads: int) -> None:
    """Store one call. ``kv_num_blocks`` (B, H, M) from the pattern search, None for a dense run.

    A new prefill starts when a layer index repeats (layers are numbered by SDPA call order).
    """
    if kv_num_blocks is None:
        heads = (1.0,) * num_heads
    else:
        M = kv_num_blocks.shape[-1]
        per_head = kv_num_blocks.double().sum(-1).mean(0) / (M * (M + 1) / 2)
        heads = tuple(float(x) for x in per_head.cpu())
    with _lock:
        if layer in _prefill["seen"]:
            _prefill["index"] += 1
            _prefill["seen"] = set()
        _prefill["seen"].add(layer)
        row = LayerStats(_prefill["index"], layer, seq_len, batch, block_size, alpha,
                         kv_num_blocks is not None, heads)
        _rows.append(row)
    log.debug("flashprefill layer %d: S=%d %s density %.3f", layer, seq_len,
              "sparse" if row.sparse else "dense", row.density)
