"""Plain-torch reference of FlashPrefill: the definition every Triton kernel must match.

Layouts: q (B, H, S, D); k, v (B, Hkv, S, D) with H % Hkv == 0. Query head h reads kv head
h // (H // Hkv); k and v are never repeated in memory (q is viewed as (B, Hkv, G, S, D)).
Blocks of ``block_size`` tokens, M = ceil(S / block_size). Work is done in chunks of query rows
so that no S x S tensor is ever built, on any device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Upper bound on the fp32 scratch one chunk of logits may take (bytes).
_CHUNK_BYTES = 256 * 1024 * 1024


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def default_scale(head_dim: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(t.dtype, torch.float32)


def _group_view(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(B, H, S, D) -> (B, Hkv, G, S, D) without a copy when q's head dim is contiguous."""
    B, H, S, D = q.shape
    return q.unflatten(1, (num_kv_heads, H // num_kv_heads))


def key_block_means(k: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean key of each key block, padding excluded: (B, Hkv, S, D) -> (B, Hkv, M, D) fp32 (fp64 for fp64)."""
    B, Hkv, S, D = k.shape
    M = cdiv(S, block_size)
    kf = F.pad(k.to(acc_dtype(k)), (0, 0, 0, M * block_size - S))
    sums = kf.view(B, Hkv, M, block_size, D).sum(dim=3)
    counts = torch.full((M,), float(block_size), device=k.device, dtype=sums.dtype)
    counts[-1] = S - (M - 1) * block_size
    return sums / counts[:, None]


def key_block_stats(k: torch.Tensor, v: torch.Tensor, block_size: int):
    """Per key block: mean key, mean value (fp32, (B, Hkv, M, D)) and token count ((M,) fp32)."""
    S = k.shape[2]
    M = cdiv(S, block_size)
    kmean = key_block_means(k, block_size)
    counts = torch.full((M,), float(block_size), device=k.device, dtype=kmean.dtype)
    counts[-1] = S - (M - 1) * block_size
    return kmean, key_block_means(v, block_size), counts


def _rows_per_chunk(B: int, H: int, width: int, multiple: int) -> int:
    rows = max(1, _CHUNK_BYTES // max(1, B * H * width * 4))
    return max(multiple, rows // multiple * multiple)


def block_scores_reference(q: torch.Tensor, kmean: torch.Tensor, scale: float, block_size: int,
                           q_block_start: int, q_block_end: int) -> torch.Tensor:
    """Unnormalised block scores of query blocks [q_block_start, q_block_end).

    score_ij = sum over real rows r of block i of exp(scale * q_r . kmean_j - m_i), for key
    blocks j < i, where m_i is the max of those logits over the rows of block i and all j < i.
    Entries j >= i are 0. Returns (B, H, n, M) fp32. (The paper normalises each row to sum 1;
    the threshold is relative to the row max, so that scaling never changes the selection.)
    """
    B, H, S, D = q.shape
    Hkv, M = kmean.shape[1], kmean.shape[2]
    n = q_block_end - q_block_start
    r0, r1 = q_block_start * block_size, min(S, q_block_end * block_size)
    qc = _group_view(q[:, :, r0:r1], Hkv).to(kmean.dtype)
    logits = scale * torch.matmul(qc, kmean.unsqueeze(2).transpose(-1, -2))  # (B,Hkv,G,rows,M)
    logits = F.pad(logits, (0, 0, 0, n * block_size - (r1 - r0)), value=float("-inf"))
    logits = logits.view(B, Hkv, -1, n, block_size, M)
    i = torch.arange(q_block_start, q_block_end, device=q.device)
    j = torch.arange(M, device=q.device)
    before = j[None, :] < i[:, None]  # (n, M)
    logits = logits.masked_fill(~before[:, None, :], float("-inf"))
    m = logits.amax(dim=(-2, -1), keepdim=True)
    # Rows with no key block before them (i == 0) have m = -inf; keep them at zero, not NaN.
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    scores = torch.exp(logits - m).sum(dim=-2)  # (B,Hkv,G,n,M)
    return scores.flatten(1, 2)


def structural_keep(M: int, n_start: int, n_end: int, sink_blocks: int, window_blocks: int,
                    last_dense_blocks: int, device) -> torch.Tensor:
    """Blocks kept whatever the scores say, for query blocks [n_start, n_end): (n, M) bool."""
    i = torch.arange(n_start, n_end, device=device)[:, None]
    j = torch.arange(M, device=device)[None, :]
    causal = j <= i
    keep = (j < sink_blocks) | (j > i - window_blocks) | (i >= M - last_dense_blocks)
    return keep & causal


def vertical_slash_scores_reference(q: torch.Tensor, k: torch.Tensor, scale: float,
                                    block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level attention of the last query block, per key column and per diagonal.

    The probe rows are the real rows r of the last query block (R = S - (M - 1) * block_size
    of them) and p their exact causal softmax (cost: one query block of dense attention, as
    MInference estimates vertical and slash lines). Returns two (B, H, S) tensors, fp32 (fp64
    for fp64 inputs):

    * ``column[s]`` = mean over r of p[r, s];
    * ``diagonal[o]`` = mean over r of (p[r, r - o] - column[r - o]) (terms with r - o < 0 are
      0): the mass on diagonal o beyond what the columns explain. A salient span seen from R
      rows puts as much on each diagonal as on each column; subtracting the column part keeps
      only what changes with the row, i.e. true slash lines.
    """
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    M = cdiv(S, block_size)
    r0 = (M - 1) * block_size
    rows = torch.arange(r0, S, device=q.device)
    kf = k.to(acc_dtype(k))
    qc = _group_view(q[:, :, r0:], Hkv).to(kf.dtype)
    logits = scale * torch.matmul(qc, kf.unsqueeze(2).transpose(-1, -2))  # (B,Hkv,G,R,S)
    cols = torch.arange(S, device=q.device)
    logits = logits.masked_fill(cols[None, :] > rows[:, None], float("-inf"))
    p = torch.softmax(logits, dim=-1).flatten(1, 2)  # (B,H,R,S)
    column = p.mean(dim=-2)
    key = rows[:, None] - cols[None, :]  # (R, S): key index r - o, offset o along the last dim
    index = key.clamp_min(0).expand(B, H, -1, -1)
    excess = (p.gather(-1, index) - column[:, :, None, :].expand_as(p).gather(-1, index))
    excess = excess * (key >= 0)
    # A slash line is there in every row; row-to-row noise of a salient span is not: keep the
    # smaller of the two halves' means (with one row, its own excess).
    R = excess.shape[-2]
    if R == 1:
        return column, excess[..., 0, :]
    half = R // 2
    first = excess[..., :half, :].sum(dim=-2) / R * 2
    second = excess[..., half:, :].sum(dim=-2) / R * 2
    return column, torch.minimum(first, second)


def vertical_slash_flags_reference(q: torch.Tensor, k: torch.Tensor, scale: float,
                                   block_size: int, threshold: float
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Heavy key columns and diagonals as block flags, each (B, H, M) bool.

    ``column_blocks[j]``: key block j holds a key whose column score is >= threshold (a share
    of the probe rows' attention mass). ``diagonal_blocks[d]``: some offset o with diagonal
    score >= threshold makes query block i
    read key block i - d: o = c * block_size + m sends rows of block i to key blocks i - c
    (rows r >= m within the block) and i - c - 1 (rows r < m, when m > 0).
    """
    B, H, S, D = q.shape
    M = cdiv(S, block_size)
    column, diagonal = vertical_slash_scores_reference(q, k, scale, block_size)
    pad = M * block_size - S
    heavy_col = F.pad(column >= threshold, (0, pad))
    column_blocks = heavy_col.view(B, H, M, block_size).any(dim=-1)
    heavy = F.pad(diagonal >= threshold, (0, pad)).view(B, H, M, block_size)
    diagonal_blocks = heavy.any(dim=-1)  # offset block c = o // block_size
    partial = heavy[..., 1:].any(dim=-1)  # some heavy o with o % block_size > 0 -> also c + 1
    diagonal_blocks[..., 1:] |= partial[..., :-1]
    return column_blocks, diagonal_blocks


def add_vertical_slash(keep: torch.Tensor, column_blocks: torch.Tensor,
                       diagonal_blocks: torch.Tensor) -> torch.Tensor:
    """keep (B, H, n, M) rows of query blocks [M - n, ... ) or all M; returns keep with, for every
    query block i, key blocks j <= i where column_blocks[j] or diagonal_blocks[i - j] added."""
    M = keep.shape[-1]
    i = torch.arange(M - keep.shape[-2], M, device=keep.device)[:, None]
    j = torch.arange(M, device=keep.device)[None, :]
    causal = j <= i
    d = (i - j).clamp_min(0)
    extra = column_blocks[:, :, None, :] | diagonal_blocks[:, :, d]
    return keep | (extra & causal)


def select_mask_reference(q: torch.Tensor, k: torch.Tensor, scale: float, block_size: int,
                          alpha: float, sink_blocks: int, window_blocks: int,
                          last_dense_blocks: int, gqa_shared: bool = False,
                          vertical_slash: bool = False, vs_threshold: float = 0.015
                          ) -> torch.Tensor:
    """Kept (query block, key block) pairs as a dense bool mask (B, H, M, M).

    With ``vertical_slash``, key blocks of heavy columns and diagonals found by
    ``vertical_slash_flags_reference`` are added to every query block they reach.
    """
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    M = cdiv(S, block_size)
    kmean = key_block_means(k, block_size)
    if q.dtype in (torch.float16, torch.bfloat16):
        # The key means are rounded to the inputs' 16-bit dtype, as the Triton search feeds
        # them to a tensor-core dot (fp32 accumulation); scores are then fp32 sums as here.
        kmean = kmean.to(q.dtype).to(kmean.dtype)
    keep = torch.empty(B, H, M, M, dtype=torch.bool, device=q.device)
    step = max(1, _rows_per_chunk(B, H, M, block_size) // block_size)
    for i0 in range(0, M, step):
        i1 = min(M, i0 + step)
        scores = block_scores_reference(q, kmean, scale, block_size, i0, i1)
        rowmax = scores.amax(dim=-1, keepdim=True)
        # "not below" rather than ">=": NaN scores keep their block, so NaN/inf inputs spread
        # through the output as they would in dense attention.
        chosen = ~(scores < alpha * rowmax)
        i = torch.arange(i0, i1, device=q.device)[:, None]
        j = torch.arange(M, device=q.device)[None, :]
        chosen &= j < i
        keep[:, :, i0:i1] = chosen | structural_keep(
            M, i0, i1, sink_blocks, window_blocks, last_dense_blocks, q.device)
    if vertical_slash:
        keep = add_vertical_slash(
            keep, *vertical_slash_flags_reference(q, k, scale, block_size, vs_threshold))
    if gqa_shared:
        keep = gqa_union(keep, Hkv)
    return keep


def gqa_union(keep: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """keep (B, H, M, M) with each query head's row set to the union over its kv group."""
    B, H, n, M = keep.shape
    if H == num_kv_heads:
        return keep
    G = H // num_kv_heads
    union = keep.unflatten(1, (num_kv_heads, G)).any(dim=2, keepdim=True)
    return union.expand(B, num_kv_heads, G, n, M).flatten(1, 2).contiguous()


def compact_mask(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (B, H, M, M) bool -> (kv_num_blocks (B, H, M) int32, kv_indices (B, H, M, M) int32).

    Each row of kv_indices lists its kept key blocks ascending; entries past the count are 0.
    """
    M = keep.shape[-1]
    j = torch.arange(M, device=keep.device)
    order = torch.where(keep, j, j + M).argsort(dim=-1)
    num = keep.sum(dim=-1, dtype=torch.int32)
    idx = torch.where(j < num[..., None], order, torch.zeros_like(order))
    return num, idx.to(torch.int32)


def expand_indices(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor) -> torch.Tensor:
    """Compact form -> dense (B, H, M, M) bool mask."""
    M = kv_indices.shape[-1]
    valid = torch.arange(M, device=kv_indices.device) < kv_num_blocks[..., None]
    keep = torch.zeros(kv_indices.shape, dtype=torch.bool, device=kv_indices.device)
    keep.scatter_(-1, kv_indices.long(), valid)
    # scatter of a False from an unused slot must not clear a kept block 0
    keep[..., 0] |= (valid & (kv_indices == 0)).any(dim=-1)
    return keep


def block_sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                     kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
                                     scale: float, block_size: int,
                                     mean_correction: bool = False) -> torch.Tensor:
    """Exact causal softmax attention restricted to the kept blocks. Returns (B, H, S, D).

    With ``mean_correction`` every skipped key block that lies fully before the query block
    enters the softmax as one pseudo-token: logit scale * q . kmean_j + log(count_j), value
    vmean_j (FlashPrefill V2's zero-order term).
    """
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    M = cdiv(S, block_size)
    keep = expand_indices(kv_num_blocks, kv_indices)  # (B,H,M,M)
    keep_g = keep.unflatten(1, (Hkv, H // Hkv))
    out = torch.empty_like(q)
    kf, vf = k.to(acc_dtype(k)), v.to(acc_dtype(v))
    if mean_correction:
        kmean, vmean, counts = key_block_stats(k, v, block_size)
    rows_step = _rows_per_chunk(B, H, S + (M if mean_correction else 0), 1)
    cols = torch.arange(S, device=q.device)
    col_block = cols // block_size
    for r0 in range(0, S, rows_step):
        r1 = min(S, r0 + rows_step)
        rows = torch.arange(r0, r1, device=q.device)
        row_block = rows // block_size
        qc = _group_view(q[:, :, r0:r1], Hkv).to(kf.dtype)
        logits = scale * torch.matmul(qc, kf.unsqueeze(2).transpose(-1, -2))  # (B,Hkv,G,r,S)
        block_ok = keep_g[:, :, :, row_block][..., col_block]  # (B,Hkv,G,r,S)
        allowed = block_ok & (cols[None, :] <= rows[:, None])
        logits = logits.masked_fill(~allowed, float("-inf"))
        if mean_correction:
            skipped = ~keep_g[:, :, :, row_block] & (
                torch.arange(M, device=q.device)[None, :] < row_block[:, None])
            pseudo = scale * torch.matmul(qc, kmean.unsqueeze(2).transpose(-1, -2))
            pseudo = (pseudo + counts.log()).masked_fill(~skipped, float("-inf"))
            p = torch.softmax(torch.cat([logits, pseudo], dim=-1), dim=-1)
            o = torch.matmul(p[..., :S], vf.unsqueeze(2)) + torch.matmul(
                p[..., S:], vmean.unsqueeze(2))
        else:
            p = torch.softmax(logits, dim=-1)
            o = torch.matmul(p, vf.unsqueeze(2))
        out[:, :, r0:r1] = o.flatten(1, 2).to(q.dtype)
    return out


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """Dense causal SDPA, the short-sequence path and the ground truth of the tests."""
    return F.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def flash_prefill_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                            block_size: int, alpha: float, sink_blocks: int, window_blocks: int,
                            last_dense_blocks: int, min_seq_len: int,
                            mean_correction: bool = False,
                            gqa_shared: bool = False, vertical_slash: bool = False,
                            vs_threshold: float = 0.015) -> torch.Tensor:
    """The whole op in plain torch: dense below ``min_seq_len``, else select + sparse attention."""
    if q.shape[2] < min_seq_len:
        return dense_causal_attention(q, k, v, scale)
    keep = select_mask_reference(q, k, scale, block_size, alpha, sink_blocks, window_blocks,
                                 last_dense_blocks, gqa_shared, vertical_slash, vs_threshold)
    num, idx = compact_mask(keep)
    return block_sparse_attention_reference(q, k, v, num, idx, scale, block_size,
                                            mean_correction)
