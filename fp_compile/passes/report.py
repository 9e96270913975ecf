"""What the SDPA rewrite did to a graph: ``RewriteReport`` of ``Rewritten`` and ``Skipped`` nodes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


class Rewritten(NamedTuple):
    node: str
    layer: int
    q_shape: tuple
    kv_shape: tuple    # shape of the k/v the op receives (after folding a head repeat)
    folded: str        # "" or what was folded away ("expand+reshape", "causal attn_mask", ...)
    form: str = "plain"  # or the call's span: "padded", "offset", "padded + offset"


class Skipped(NamedTuple):
    node: str
    layer: int
    reason: str


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


@dataclass
class RewriteReport:
    """What ``rewrite_sdpa`` did: the rewritten SDPA nodes and, for the others, why not."""

    rewritten: list[Rewritten] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    graphs: int = 1
    # What the rewritten calls did when run (``explain`` fills it): a stats table, or None.
    stats: object = None

    @classmethod
    def merge(cls, reports: list["RewriteReport"]) -> "RewriteReport":
        """One report for several graphs (graph breaks, prefill and decode graphs)."""
        merged = cls(graphs=sum(r.graphs for r in reports))
        for r in reports:
            merged.rewritten.extend(r.rewritten)
            merged.skipped.extend(r.skipped)
        return merged

    def summary(self) -> str:
        """One line: how many SDPA calls were rewritten and how many left dense."""
        return (f"flashprefill: {len(self.rewritten)} SDPA call(s) rewritten, "
                f"{len(self.skipped)} left dense"
                + (f" in {self.graphs} graphs" if self.graphs > 1 else ""))

    def table(self) -> str:
        rows = [("layer", "node", "action", "detail")]
        entries = [(r.layer, r.node, "flash_prefill",
                    f"q {_fmt_shape(r.q_shape)} kv {_fmt_shape(r.kv_shape)}"
                    + (f" (folded {r.folded})" if r.folded else "")
                    + (f" [{r.form}]" if r.form != "plain" else "")) for r in self.rewritten]
        entries += [(s.layer, s.node, "dense", s.reason) for s in self.skipped]
        rows += [(str(layer), node, action, detail)
                 for layer, node, action, detail in sorted(entries, key=lambda e: e[0])]
        widths = [max(len(row[c]) for row in rows) for c in range(3)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3]
                 for row in rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        head = self.summary()
        text = head if not (self.rewritten or self.skipped) else head + "\n" + self.table()
        if self.stats is not None and len(self.stats):
            text += "\n\nwhat the rewritten calls did in this run:\n" + str(self.stats)
        return text
