"""Which FlashPrefill calls are expected to run dense: the dispatch's speculative dense launch.

The dense decision (``dispatch.probe``) is read on the host. While the host waits for it, the
GPU runs what was queued behind the probe: normally the first selection, which a call that
then runs dense throws away, and after it the GPU idles until the host launches cuDNN. On the
H200 that cost a structure-less call about 0.2-0.35 ms at 16K-32K (RESULTS.md runs 22-23;
0.93-0.95x cuDNN). So a call whose last ``DENSE_STREAK`` decisions, for the same layer, batch,
heads and length bucket (the bit length of S), were "every kv group dense" queues cuDNN
itself behind the probe: if the probe agrees, that is the output and the GPU never waited.

The output does not depend on the guess: a wrong guess (the probe says sparse or mixed) reads
the flagged groups from the dense output already computed and runs the rest block-sparse, as
without the guess; it costs one dense call, which is why the guess is made only below
``SPECULATE_BELOW`` tokens (where a dense call is cheap and the saved 0.2 ms counts) and never
while stats are collected. Nothing is guessed during CUDA-graph capture (no decision is read
then). The history holds at most ``HISTORY_KEYS`` keys, the oldest dropped.
"""

from __future__ import annotations

import torch

from .config import FlashPrefillConfig

DENSE_STREAK = 2
SPECULATE_BELOW = 65536
HISTORY_KEYS = 1024
_history: dict[tuple, int] = {}


def key(q: torch.Tensor, k: torch.Tensor, layer: int) -> tuple:
    """The call's history key: (layer, B, H, Hkv, bit length of S, device)."""
    B, H, S, _ = q.shape
    return (layer, B, H, k.shape[1], S.bit_length(), q.device)


def expect_dense(key: tuple, q: torch.Tensor, config: FlashPrefillConfig) -> bool:
    """Whether to queue the dense call behind the probe (see the module's docstring)."""
    return (q.shape[2] < SPECULATE_BELOW and not config.collect_stats
            and _history.get(key, 0) >= DENSE_STREAK)


def remember(key: tuple, all_dense: bool) -> None:
    """Record a decision: the key's count of consecutive all-dense decisions (0 after any
    other), the key moved to the newest place."""
    streak = _history.pop(key, 0)
    if len(_history) >= HISTORY_KEYS:
        _history.pop(next(iter(_history)))
    _history[key] = streak + 1 if all_dense else 0


def clear() -> None:
    """Forget every decision (tests; a new model)."""
    _history.clear()
