"""Context-parallel K/V traffic, counted: what each rank must receive under dense ring attention
and under a selection-aware exchange, from kept-block masks (docs/context_parallel.md).

The model: S tokens in M blocks of ``block_size`` tokens, sharded over R ranks by whole blocks
(``Sharding``: contiguous, or zigzag as torch's context_parallel balances causal attention:
rank r holds chunks r and 2R-1-r of 2R). Rank r owns the query, key and value rows of its
blocks. K/V are per kv head, so one kv group (the G query heads sharing a k/v head) is the unit
of exchange: ``group_exchange`` takes the G heads' kept-block masks ``keeps`` (G, M, M) bool
(``keeps[h, i, j]``: query block i of head h attends key block j; causal, j <= i).

Strategies, per rank (bytes with ``Shape``'s sizes; ``rank_traffic`` puts them together):

* dense ring, every shard: the other ranks' K/V blocks, all of them (a ring passes each shard
  round, masked or not);
* dense ring, causal only: the other ranks' blocks j <= the rank's last query block;
* selection-aware pull: the other ranks' blocks that some query block of the rank keeps, for
  some head of the group, plus the key-block means (all-gathered: the search scores every key
  block) and a request bitmap (one bit per owned block, per kv head, from every other rank);
* pull + push: query blocks that keep at least ``push_frac`` of the blocks they can see on
  another rank (the dense last rows, the mass guard's full rung) send their G heads' queries
  there instead and get back the partial output (q's dtype) and log-sum-exp (fp32), merged by
  LSE, where that moves fewer bytes for the pair of ranks than pulling; the rest is pulled.

Compute per rank: dense causal attention counts exact causal (query, key) token pairs; the
block-sparse kernel counts kept blocks as full block x block tiles (the diagonal tile too),
4 * D FLOPs per pair, at the throughputs passed to ``rank_times``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sharding:
    """Blocks 0..num_blocks-1 over ``ranks`` ranks: ``chunks`` are (start, end, rank) ranges."""

    name: str
    ranks: int
    num_blocks: int
    chunks: tuple[tuple[int, int, int], ...]

    def owner(self, device=None) -> torch.Tensor:
        """(M,) long: the rank that holds each block."""
        own = torch.empty(self.num_blocks, dtype=torch.long, device=device)
        for s, e, r in self.chunks:
            own[s:e] = r
        return own

    def ranges(self, rank: int) -> list[tuple[int, int]]:
        return [(s, e) for s, e, r in self.chunks if r == rank]

    def own_blocks(self, rank: int) -> int:
        return sum(e - s for s, e in self.ranges(rank))

    def last_block(self, rank: int) -> int:
        return max(e for _, e in self.ranges(rank)) - 1


def _chunk_bounds(num_blocks: int, parts: int) -> list[tuple[int, int]]:
    if num_blocks % parts:
        raise ValueError(f"{num_blocks} blocks do not split into {parts} equal chunks")
    c = num_blocks // parts
    return [(p * c, (p + 1) * c) for p in range(parts)]


def contiguous(num_blocks: int, ranks: int) -> Sharding:
    """Rank r holds the r-th of R equal block ranges (causal work grows with r)."""
    chunks = tuple((s, e, r) for r, (s, e) in enumerate(_chunk_bounds(num_blocks, ranks)))
    return Sharding("contiguous", ranks, num_blocks, chunks)


def zigzag(num_blocks: int, ranks: int) -> Sharding:
    """2R equal chunks, rank r holds chunks r and 2R-1-r (equal causal work per rank)."""
    bounds = _chunk_bounds(num_blocks, 2 * ranks)
    chunks = tuple((s, e, c if c < ranks else 2 * ranks - 1 - c) for c, (s, e) in
                   enumerate(bounds))
    return Sharding("zigzag", ranks, num_blocks, chunks)


SHARDINGS = {"contiguous": contiguous, "zigzag": zigzag}


@dataclass(frozen=True)
class Shape:
    """Sizes for the byte counts: all heads of the attention call, bf16 by default."""

    block_size: int
    head_dim: int
    heads: int
    kv_heads: int
    dtype_bytes: int = 2

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def kv_block_bytes(self) -> int:
        """K and V of one block, one kv head."""
        return 2 * self.block_size * self.head_dim * self.dtype_bytes

    @property
    def push_bytes(self) -> int:
        """One query block pushed, one kv group: G heads' q out, partial out + fp32 LSE back."""
        b, D, dt = self.block_size, self.head_dim, self.dtype_bytes
        return self.group * b * D * dt + self.group * b * (D * dt + 4)


def dense_counts(sh: Sharding, block_size: int) -> dict[str, list[int]]:
    """Per rank: ``remote_all`` and ``remote_causal`` blocks (other ranks' blocks, all / up to
    the rank's last query block) and ``causal_pairs`` (query, key) token pairs with key <= query
    over the rank's query rows (each of the rank's blocks i: b * i * b + b * (b + 1) / 2)."""
    b = block_size
    own = sh.owner()
    out = {"remote_all": [], "remote_causal": [], "causal_pairs": []}
    for r in range(sh.ranks):
        last = sh.last_block(r)
        out["remote_all"].append(sh.num_blocks - sh.own_blocks(r))
        out["remote_causal"].append(int((own[:last + 1] != r).sum()))
        pairs = sum(b * b * i + b * (b + 1) // 2 for s, e in sh.ranges(r) for i in range(s, e))
        out["causal_pairs"].append(pairs)
    return out


def _per_rank_counts(keep: torch.Tensor, sh: Sharding) -> torch.Tensor:
    """keep (..., M, M) bool -> (..., M, R) long: kept blocks of each row held by each rank."""
    cols = [sum(keep[..., s:e].sum(-1) for s, e in sh.ranges(r)) for r in range(sh.ranks)]
    return torch.stack(cols, dim=-1)


def _visible(sh: Sharding, device) -> torch.Tensor:
    """(M, R) long: blocks j <= i of row i held by each rank."""
    i = torch.arange(sh.num_blocks, device=device)
    cols = [sum((i + 1 - s).clamp(0, e - s) for s, e in sh.ranges(r)) for r in range(sh.ranks)]
    return torch.stack(cols, dim=-1)


def push_candidates(union: torch.Tensor, sh: Sharding, push_frac: float | None
                    ) -> torch.Tensor:
    """(M, R) bool: query block i may push its queries to rank o (``push_frac`` None: never).

    union (M, M) bool: the group's kept blocks (any head). A candidate keeps at least one block
    on o, another rank, and at least ``push_frac`` of the blocks it can see there.
    """
    M, R = sh.num_blocks, sh.ranks
    if push_frac is None:
        return torch.zeros(M, R, dtype=torch.bool, device=union.device)
    count = _per_rank_counts(union, sh)
    own = sh.owner(union.device)
    remote = own[:, None] != torch.arange(R, device=union.device)[None, :]
    return remote & (count > 0) & (count >= push_frac * _visible(sh, union.device))


def _needed(union: torch.Tensor, sh: Sharding, r: int, o: int, skip: torch.Tensor) -> int:
    """Blocks of rank o that rank r's query blocks keep, rows with ``skip[i]`` left out."""
    n = 0
    for cs, ce in sh.ranges(o):
        need = torch.zeros(ce - cs, dtype=torch.bool, device=union.device)
        for rs, re in sh.ranges(r):
            rows = union[rs:re, cs:ce][~skip[rs:re]]
            if rows.numel():
                need |= rows.any(dim=0)
        n += int(need.sum())
    return n


def group_exchange(keeps: torch.Tensor, sh: Sharding, shape: Shape,
                   push_frac: float | None = None, union: torch.Tensor | None = None
                   ) -> dict[str, list[int]]:
    """One kv group's exchange, per rank r (lists of R ints).

    keeps (G, M, M) bool. For each pair (r, o) of ranks, r either pulls every block of o that
    its query blocks keep (union over the G heads), or pushes its candidate rows
    (``push_candidates``) to o and pulls what its other rows keep there, whichever moves fewer
    bytes. ``pulled``: other ranks' key blocks r fetches; ``pushed_out``: r's (query block,
    rank) pushes (their partial outputs come back); ``pushed_in``: other ranks' query blocks
    pushed to r; ``tiles``: kept (head, query block, key block) tiles computed on r (a pushed
    row's tiles on the rank it was pushed to). ``union``: ``keeps.any(0)`` if the caller has it.
    """
    R = sh.ranks
    union = keeps.any(dim=0) if union is None else union
    cand = push_candidates(union, sh, push_frac)
    pushed = torch.zeros_like(cand)
    own = sh.owner(keeps.device)
    none = torch.zeros(sh.num_blocks, dtype=torch.bool, device=keeps.device)
    pulled = [0] * R
    for r, o in itertools.permutations(range(R), 2):
        pull_all = _needed(union, sh, r, o, none)
        rows = cand[:, o] & (own == r)
        n_push = int(rows.sum())
        if n_push:
            rest = _needed(union, sh, r, o, rows)
            if rest * shape.kv_block_bytes + n_push * shape.push_bytes < \
                    pull_all * shape.kv_block_bytes:
                pushed[:, o] |= rows
                pulled[r] += rest
                continue
        pulled[r] += pull_all
    tiles_by_rank = _per_rank_counts(keeps, sh).sum(dim=0)                # (M, R)
    ranks = torch.arange(R, device=keeps.device)
    runs_on = torch.where(pushed, ranks[None, :], own[:, None])
    tiles = torch.zeros(R, dtype=torch.long, device=keeps.device)
    tiles.index_add_(0, runs_on.flatten(), tiles_by_rank.flatten())
    return {
        "pulled": pulled,
        "pushed_out": [int(pushed[own == r].sum()) for r in range(R)],
        "pushed_in": [int(pushed[:, r].sum()) for r in range(R)],
        "tiles": tiles.tolist(),
    }


def add_counts(total: dict[str, list[int]] | None, counts: dict[str, list[int]]):
    """Element-wise sum of two ``group_exchange`` results (None: start)."""
    if total is None:
        return {k: list(v) for k, v in counts.items()}
    return {k: [a + b for a, b in zip(total[k], counts[k])] for k in total}


def rank_traffic(sh: Sharding, shape: Shape, pull: dict[str, list[int]],
                 push: dict[str, list[int]], groups_scale: float = 1.0
                 ) -> dict[str, list[float]]:
    """Bytes each rank receives under each strategy.

    pull / push: ``group_exchange`` results summed over the kv groups counted (without and with
    pushes), scaled by ``groups_scale`` (kv_heads / groups counted) when only some groups were
    simulated. ``ring_push``: the dense ring with the same pushes (each rank holds every block
    by the end of the ring, so there a push only moves work). Both selection-aware strategies
    include ``means`` (the other ranks' key-block
    means, every kv head) and ``bitmap`` (the requests: per kv head, one bit per owned block
    from each other rank).
    """
    b, D, dt, Hkv = shape.block_size, shape.head_dim, shape.dtype_bytes, shape.kv_heads
    dense = dense_counts(sh, b)
    R = sh.ranks
    means = [dense["remote_all"][r] * Hkv * D * dt for r in range(R)]
    bitmap = [(R - 1) * Hkv * math.ceil(sh.own_blocks(r) / 8) for r in range(R)]
    kvb = shape.kv_block_bytes
    q_block = shape.group * b * D * dt
    back = shape.group * b * (D * dt + 4)
    pushes = [groups_scale * (push["pushed_in"][r] * q_block + push["pushed_out"][r] * back)
              for r in range(R)]
    return {
        "ring_all": [n * Hkv * kvb for n in dense["remote_all"]],
        "ring_push": [n * Hkv * kvb + p for n, p in zip(dense["remote_all"], pushes)],
        "ring_causal": [n * Hkv * kvb for n in dense["remote_causal"]],
        "means": means,
        "bitmap": bitmap,
        "sel_pull": [groups_scale * pull["pulled"][r] * kvb + means[r] + bitmap[r]
                     for r in range(R)],
        "sel_push": [groups_scale * push["pulled"][r] * kvb + pushes[r] + means[r] + bitmap[r]
                     for r in range(R)],
    }


def comm_ms(nbytes: float, gbps: float) -> float:
    """Time to receive ``nbytes`` at ``gbps`` GB/s (1e9 bytes per second), in ms."""
    return nbytes / (gbps * 1e9) * 1e3


def rank_times(sh: Sharding, shape: Shape, pull: dict[str, list[int]],
               push: dict[str, list[int]], groups_scale: float, dense_tflops: float,
               sparse_tflops: float) -> dict[str, list[float]]:
    """Attention compute per rank (ms): dense causal, block-sparse (pull, push placement)."""
    D, b = shape.head_dim, shape.block_size
    pairs = dense_counts(sh, b)["causal_pairs"]

    def ms(flops: float, tflops: float) -> float:
        return flops / (tflops * 1e12) * 1e3

    return {
        "dense": [ms(4 * D * shape.heads * p, dense_tflops) for p in pairs],
        "sparse_pull": [ms(4 * D * b * b * groups_scale * t, sparse_tflops)
                        for t in pull["tiles"]],
        "sparse_push": [ms(4 * D * b * b * groups_scale * t, sparse_tflops)
                        for t in push["tiles"]],
    }
