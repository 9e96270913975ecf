"""The dense decision's rule (``dense_groups``), its read on the host (``host_flags``), and
which calls are expected to run dense, or sparse: the dispatch's speculation.

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

The other way round: a call whose last ``SPARSE_STREAK`` decisions were "no kv group dense"
(and whose selection fits one chunk) skips the probe. It runs the whole selection, reads the
dense decision off that selection's probe rows (the same rows, so the same flags), and queues
the block-sparse attention before the host waits for them: the host's work after the wait then
overlaps the attention instead of leaving the GPU idle. A wrong guess runs the flagged groups
dense over the speculative output (some groups), or the whole call dense (every group): the
same output as without the guess, at the cost of the wasted attention, which at full density
is slower than the dense call itself. Same limits as the dense guess.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .config import FlashPrefillConfig

# When more than this share of a call's kv groups is above ``dense_above``, the whole call runs
# dense: on the H200 (RESULTS.md run 13, 8K) sparse + dense for 24 of 32 heads took 1.67 ms, one
# dense call 0.88 ms.
MOSTLY_DENSE = 0.5

DENSE_STREAK = 2
SPARSE_STREAK = 2
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


def expect_sparse(key: tuple, q: torch.Tensor, config: FlashPrefillConfig) -> bool:
    """Whether to skip the probe and queue the block-sparse attention before the dense decision
    is read (see the module's docstring)."""
    return (q.shape[2] < SPECULATE_BELOW and not config.collect_stats
            and _history.get(key, 0) <= -SPARSE_STREAK)


def remember(key: tuple, all_dense: bool, any_dense: bool) -> None:
    """Record a decision (whether every / any kv group runs dense): the key's streak, > 0 for
    consecutive all-dense decisions, < 0 for consecutive decisions with no dense group, 0
    after a mixed one; the key moved to the newest place."""
    streak = _history.pop(key, 0)
    if len(_history) >= HISTORY_KEYS:
        _history.pop(next(iter(_history)))
    if all_dense:
        _history[key] = max(streak, 0) + 1
    elif not any_dense:
        _history[key] = min(streak, 0) - 1
    else:
        _history[key] = 0


def clear() -> None:
    """Forget every decision (tests; a new model)."""
    _history.clear()


def dense_groups(num: torch.Tensor, num_kv_heads: int, dense_above: float,
                 rows: tuple[int, int, int] | None = None) -> torch.Tensor:
    """(B, Hkv) bool, on num's device: the kv groups that run dense.

    num: kv_num_blocks (B, H, n) of the query blocks ``rows`` (start, step, n; all M blocks
    when None). A group runs dense when its kept density over those rows (kept blocks over
    causal blocks, all its query heads) is above ``dense_above``; every group does when more
    than ``MOSTLY_DENSE`` of them would.
    """
    B, H, n = num.shape
    start, step, _ = rows if rows is not None else (0, 1, n)
    # causal blocks of the rows: sum over c of (start + c * step + 1)
    causal = n * (start + 1) + step * n * (n - 1) // 2
    kept = num.to(torch.float32).sum(dim=-1).view(B, num_kv_heads, H // num_kv_heads).mean(-1)
    flags = kept > dense_above * causal
    # Mostly dense: one dense call beats a sparse call plus dense calls on the rest.
    return flags | (flags.float().mean() > MOSTLY_DENSE)


def host_flags(num: torch.Tensor, decide: Callable[[torch.Tensor], torch.Tensor],
               ahead: Optional[Callable] = None):
    """(decide(num on the host), ahead() or None): ``num`` (the kv_num_blocks the decision
    reads) is copied to pinned memory, ahead()'s work queued behind the copy, and the host waits
    for the copy alone (the GPU works through the wait), then takes the decision there: a few
    CPU ops on (B, H, n) counts rather than small kernels in the GPU's queue."""
    ready = None
    if num.device.type == "cuda":
        host = torch.empty(num.shape, dtype=num.dtype, pin_memory=True)
        host.copy_(num, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
    else:
        host = num
    done = ahead() if ahead is not None else None
    if ready is not None:
        ready.synchronize()
    return decide(host), done
