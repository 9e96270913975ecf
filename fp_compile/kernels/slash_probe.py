"""The slash probe (``FlashPrefillConfig.slash_probe``): flags the diagonals (slash lines) of
each head from the median over a few exact query rows, for the selection to add.

Why (benchmarks/results/study_estimators.md, candidate "f_median*_diag"): on heads with slash
lines the line's tokens carry per-(row, key) logit noise of a few nats, so a line's mass comes
from a few rows and a mean over one block of rows (the last-block probe of
``vertical_slash``) or over a key block (the pattern search) misses it. A median over rows
spread across the prompt does not: a line lifts the centred logit of every row on it.

The rule, per head (q head h reads kv head h // G):

* rows: ``n_rows`` (64) query rows spread evenly over the second half of the prompt
  (``probe_rows``);
* their exact logits ``scale * q_r . k_s`` (fp32; fp64 for fp64 inputs) against every visible
  key s <= r, each row minus its mean over those keys;
* per diagonal offset o (key r - o), the median over the rows that see it (the lower median,
  as ``torch.nanmedian``), for the offsets seen by at least half of the rows (``n_offsets``);
* the head's median m and median absolute deviation a of those per-offset medians; offset o is
  flagged when its median >= m + kappa * max(a, 1e-6);
* flagged offset o sends query block i to key blocks i - o // block_size and, when o is not a
  multiple of block_size, i - o // block_size - 1: the diagonal flags (B, H, M), as
  ``vertical_slash_flags`` returns them (its columns: all False here).

Plain torch, the probe and its own reference at once (the Triton search and the reference
selection call this same function): no S x S tensor, heads taken a chunk at a time so that a
chunk's (rows x keys) logits stay within ``PROBE_BYTES``; about 4x that at the peak (the logits,
the offsets' gather, the sort of the median, k in fp32). No host synchronisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .utils import acc_dtype, cdiv

PROBE_QUERY_ROWS = 64
# The fp32 logits of one chunk of heads (n_rows x S per query head) stay within this.
PROBE_BYTES = 256 * 2**20
MAD_FLOOR = 1e-6
MEDIANS = ("nanmedian", "sort")


def probe_rows(S: int, n_rows: int = PROBE_QUERY_ROWS) -> list[int]:
    """The probe's query rows: min(n_rows, S - S // 2) rows spread evenly over S // 2 .. S - 1
    (distinct, ascending; the last is S - 1)."""
    a, b = S // 2, S - 1
    n = max(1, min(n_rows, b - a + 1))
    # integers on the host (no tensor: the op's body is traced when compiled)
    return [a + (i * (b - a)) // max(1, n - 1) for i in range(n)]


def device_rows(rows: list[int], device) -> torch.Tensor:
    """``probe_rows``' list as a long tensor built on the device by arithmetic (no host-to-device
    copy, so a CUDA graph captures it)."""
    a, n = rows[0], len(rows)
    return a + torch.arange(n, device=device) * (rows[-1] - a) // max(1, n - 1)


def n_offsets(rows: list[int]) -> int:
    """The offsets o = 0 .. n_offsets - 1 are those seen (r >= o) by at least half of the rows."""
    # sorted rows: o is seen by len(rows) - #(rows < o) rows; >= len / 2 up to this row's value
    return rows[len(rows) - (len(rows) + 1) // 2] + 1


def slash_probe_scores(q: torch.Tensor, k: torch.Tensor, scale: float,
                       n_rows: int = PROBE_QUERY_ROWS, median: str = "nanmedian"
                       ) -> torch.Tensor:
    """Per head and diagonal offset o < n_offsets, the median over the probe rows of the
    row-centred logit at key r - o: (B, H, n_offsets) fp32 (fp64 for fp64 inputs).

    q (B, H, S, D), k (B, Hkv, S, D), H % Hkv == 0. median: how the median over rows is
    taken, "nanmedian" (``torch.nanmedian`` over the rows, unseen entries NaN) or "sort" (one
    sort of each offset's rows, contiguous, then the lower median of its seen rows); the same
    values, for timing them against each other on the GPU."""
    if median not in MEDIANS:
        raise ValueError(f"slash_probe_scores: median must be one of {MEDIANS}, got {median!r}")
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    rows = probe_rows(S, n_rows)
    P, O = len(rows), n_offsets(rows)
    dtype = acc_dtype(q)
    r = device_rows(rows, q.device)
    keys = torch.arange(S, device=q.device)
    visible = keys[None, :] <= r[:, None]                                    # (P, S)
    count = visible.sum(-1).to(dtype)
    index = r[:, None] - torch.arange(O, device=q.device)[None, :]          # (P, O): key r - o
    unseen = index < 0
    index = index.clamp_min(0)
    # the lower median's position among each offset's seen rows (a suffix of the rows)
    middle = ((P - unseen.sum(0) - 1) // 2)[:, None]                        # (O, 1)
    # one kv head at least per chunk; its G * P rows x S keys of logits within PROBE_BYTES
    per_kv = B * G * P * S * torch.finfo(dtype).bits // 8
    step = max(1, min(Hkv, PROBE_BYTES // max(1, per_kv)))
    qr = q.index_select(2, r).to(dtype).view(B, Hkv, G * P, D)
    out = []
    for g0 in range(0, Hkv, step):
        g1 = min(Hkv, g0 + step)
        logits = torch.matmul(qr[:, g0:g1], k[:, g0:g1].to(dtype).transpose(-1, -2))
        logits = logits.view(B, (g1 - g0) * G, P, S).mul_(scale).masked_fill_(~visible, 0.0)
        mean = logits.sum(-1, keepdim=True) / count[:, None]
        diag = logits.gather(-1, index.expand(*logits.shape[:2], P, O)).sub_(mean)
        del logits
        diag = diag.masked_fill_(unseen, float("nan"))                       # (B, c, P, O)
        if median == "nanmedian":
            out.append(diag.nanmedian(dim=-2).values)
        else:   # NaN sorts last: the seen rows' values first, in order
            ordered = diag.transpose(-1, -2).sort(dim=-1).values            # (B, c, O, P)
            out.append(ordered.gather(-1, middle.expand(*ordered.shape[:-1], 1))[..., 0])
    return torch.cat(out, dim=1)


def slash_probe_offsets(q: torch.Tensor, k: torch.Tensor, scale: float, kappa: float,
                        n_rows: int = PROBE_QUERY_ROWS, median: str = "nanmedian"
                        ) -> torch.Tensor:
    """(B, H, n_offsets) bool: the flagged diagonal offsets (median >= head median + kappa *
    MAD over the head's offsets)."""
    score = slash_probe_scores(q, k, scale, n_rows, median)
    med = score.nanmedian(dim=-1, keepdim=True).values
    mad = (score - med).abs().nanmedian(dim=-1, keepdim=True).values.clamp_min(MAD_FLOOR)
    return score >= med + kappa * mad


def offset_blocks(heavy: torch.Tensor, block_size: int, M: int) -> torch.Tensor:
    """(B, H, M) bool diagonal block flags of flagged token offsets ``heavy`` (B, H, O), O <=
    M * block_size: offset o flags block offset o // block_size and, when o % block_size > 0,
    o // block_size + 1 (below M)."""
    B, H, O = heavy.shape
    heavy = F.pad(heavy, (0, M * block_size - O)).view(B, H, M, block_size)
    blocks = heavy.any(dim=-1)
    partial = heavy[..., 1:].any(dim=-1)
    blocks[..., 1:] |= partial[..., :-1]
    return blocks


def slash_probe_flags(q: torch.Tensor, k: torch.Tensor, scale: float, block_size: int,
                      kappa: float, n_rows: int = PROBE_QUERY_ROWS, median: str = "nanmedian"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(column_blocks, diagonal_blocks), each (B, H, M) bool, as ``vertical_slash_flags``
    returns them: the columns all False, the diagonals those of the flagged offsets."""
    B, H, S, _ = q.shape
    M = cdiv(S, block_size)
    heavy = slash_probe_offsets(q, k, scale, kappa, n_rows, median)
    diagonal = offset_blocks(heavy, block_size, M)
    return torch.zeros_like(diagonal), diagonal
