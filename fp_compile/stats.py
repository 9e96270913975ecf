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
    over the batch; 1.0 everywhere when the call ran dense (``sparse=False``, S < min_seq_len).
    ``head_mass`` (H,): the lowest estimated kept mass of any query block of the head (the
    mass guard holds it above ``mass_floor``; 1.0 when not measured). ``dense_heads`` (H,):
    heads whose kv group ran dense attention because its density was above ``dense_above``.
    ``form``: "plain", or how a call with a span came about ("padded", "offset", "cache
    buffer", joined by " + "); its density counts only the blocks a row could keep (valid
    keys, at or before the row's own position).
    """

    prefill: int
    layer: int
    seq_len: int
    batch: int
    block_size: int
    alpha: float
    sparse: bool
    head_density: tuple[float, ...]
    head_mass: tuple[float, ...] = ()
    dense_heads: tuple[bool, ...] = ()
    form: str = "plain"
    options: str = ""

    @property
    def density(self) -> float:
        return sum(self.head_density) / len(self.head_density)

    @property
    def min_mass(self) -> float:
        return min(self.head_mass, default=1.0)

    @property
    def n_dense_heads(self) -> int:
        return sum(self.dense_heads)


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
                     density=r.density, head_density=list(r.head_density),
                     head_mass=list(r.head_mass), dense_heads=list(r.dense_heads),
                     form=r.form, options=r.options)
                for r in self.rows]

    def __str__(self) -> str:
        if not self.rows:
            return "(no FlashPrefill stats recorded: set collect_stats=True)"
        lines = [f"{'prefill':>7} {'layer':>5} {'seq_len':>8} {'alpha':>6} {'mode':>6} "
                 f"{'density':>8} {'min mass':>8} {'dense h':>7}  per-head density "
                 "(* ran dense)"]
        spans = any(r.form != "plain" for r in self.rows)
        options = any(r.options for r in self.rows)
        for r in self.rows:
            heads = " ".join(f"{d:.2f}" + ("*" if r.dense_heads and r.dense_heads[h] else "")
                             for h, d in enumerate(r.head_density))
            lines.append(f"{r.prefill:>7} {r.layer:>5} {r.seq_len:>8} {r.alpha:>6.3g} "
                         f"{'sparse' if r.sparse else 'dense':>6} {r.density:>8.3f} "
                         f"{r.min_mass:>8.3f} {r.n_dense_heads:>7}  {heads}"
                         + (f"  [{r.form}]" if spans else "")
                         + (f"  ({r.options or 'paper rule'})" if options else ""))
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
           kv_num_blocks: torch.Tensor | None, num_heads: int, *,
           mass: torch.Tensor | None = None, dense_groups: torch.Tensor | None = None,
           candidates: torch.Tensor | None = None, form: str = "plain",
           options: str = "") -> None:
    """Store one call. ``kv_num_blocks`` (B, H, M) from the pattern search, None for a dense run;
    ``mass`` (B, H, M) the estimated kept mass per query block; ``dense_groups`` (B, Hkv) bool,
    the kv groups the dense fallback ran dense (a head counts as dense when its group was, in
    any batch row); ``options`` the config's ``options_summary()``.
    A call with a span: ``kv_num_blocks`` (B, H, n) and ``candidates`` (B, n), the blocks each
    row could keep; ``form`` how the span came about.

    A new prefill starts when a layer number repeats.
    """
    if kv_num_blocks is None:
        heads = (1.0,) * num_heads
    elif candidates is not None:
        possible = candidates.double().sum().clamp_min(1)
        per_head = kv_num_blocks.double().sum(dim=(0, 2)) / possible
        heads = tuple(float(x) for x in per_head.cpu())
    else:
        M = kv_num_blocks.shape[-1]
        per_head = kv_num_blocks.double().sum(-1).mean(0) / (M * (M + 1) / 2)
        heads = tuple(float(x) for x in per_head.cpu())
    head_mass = () if mass is None else tuple(
        float(x) for x in mass.amin(dim=(0, 2)).cpu())
    dense = ()
    if dense_groups is not None:
        per_head = dense_groups.repeat_interleave(num_heads // dense_groups.shape[1], dim=1)
        dense = tuple(bool(x) for x in per_head.any(dim=0).cpu())
    with _lock:
        if layer in _prefill["seen"]:
            _prefill["index"] += 1
            _prefill["seen"] = set()
        _prefill["seen"].add(layer)
        row = LayerStats(_prefill["index"], layer, seq_len, batch, block_size, alpha,
                         kv_num_blocks is not None, heads, head_mass, dense, form, options)
        _rows.append(row)
    log.debug("flashprefill layer %d: S=%d %s density %.3f", layer, seq_len,
              "sparse" if row.sparse else "dense", row.density)
