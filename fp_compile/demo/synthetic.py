"""Attention inputs with the structure real long-context heads show, for tests and benchmarks.

Random q/k give near-uniform attention, which no sparse method can skip. ``planted_qkv`` plants
what long-context heads are known to do. Every behaviour is a pair of terms, one in q and one in
k, placed in its own range of head dimensions, so the scaled logit ``scale * q_t . k_s`` gains a
known bonus (in logit units, L = log S so that a planted structure keeps its share of the softmax
mass against the ~S background tokens as S grows):

* **sink**: key 0 gets ``L + 1.5`` for every query (rank one: one shared direction).
* **salient spans**: a few spans of 64-256 keys get a smooth, block-coherent bonus ``L - 5.5``
  for every later query (same direction as the sink): what block means capture.
* **retrieval**: each query segment is aligned with one earlier key span (its own direction).
* **local window**: a RoPE-style rotation shared by q and k, ``q_t . k_s = P/n sum_i
  cos((t - s) theta_i)``: peak ``P`` at the diagonal, decaying over ~100 tokens.
* **vertical columns**: a few single keys with bonus ``L - 1.5`` for every query, the heavy
  tokens that mean pooling dilutes by the block size.
* **slash lines**: key ``t - o`` carries a random code of query ``t`` (bonus ``L - 1`` at the
  line), for one or two offsets ``o`` per kv head beyond the local window.

Query heads mix the behaviours with per-head weights (``head % 4`` picks the dominant one:
streaming, vertical, slash, retrieval); the heads of a GQA group share one k, as in real models.
Everything is vectorised and O(S * D) in memory (no S x S tensor), so it runs at S = 128K.
"""

from __future__ import annotations

import math

import torch

# Dominant behaviour of query head h: _KINDS[h % 4].
_KINDS = ("streaming", "vertical", "slash", "retrieval")


def _head_weights(H: int, Hkv: int, device) -> dict[str, torch.Tensor]:
    """Per query head logit multipliers of each behaviour, each (Hkv, G)."""
    kind = torch.arange(H, device=device).view(Hkv, H // Hkv) % 4

    def w(dominant: int, on: float, off: float) -> torch.Tensor:
        return torch.where(kind == dominant, on, off).float()

    return {
        "local": w(0, 1.0, 0.8),
        "column": w(1, 1.0, 0.6),
        "slash": w(2, 1.0, 0.0),
        "retrieval": w(3, 1.0, 0.0),
    }


def _taper(start: int, end: int, device) -> torch.Tensor:
    """(end - start, 1) weights rising smoothly from ~0 to 1 over the first and last 64 tokens.

    Salient spans fade in and out, so a block cut by a span edge holds little of its mass.
    """
    s = torch.arange(end - start, device=device, dtype=torch.float32)
    ramp = torch.minimum(s + 0.5, (end - start) - s - 0.5).clamp_max(64.0) / 64.0
    return torch.sin(0.5 * math.pi * ramp)[:, None] ** 2


def planted_qkv(batch: int = 1, heads: int = 8, kv_heads: int | None = None, seq_len: int = 4096,
                head_dim: int = 64, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", strength: float = 1.0):
    """Return q (B, H, S, D), k, v (B, Hkv, S, D) with planted attention structure.

    ``strength`` scales every planted logit bonus (0 gives plain noise). The bonuses are
    calibrated for SDPA's default scale 1/sqrt(D). Needs head_dim >= 8.
    """
    q, k, v, _ = planted_qkv_with_info(batch, heads, kv_heads, seq_len, head_dim, seed=seed,
                                       dtype=dtype, device=device, strength=strength)
    return q, k, v


def planted_qkv_with_info(batch: int = 1, heads: int = 8, kv_heads: int | None = None,
                          seq_len: int = 4096, head_dim: int = 64, *, seed: int = 0,
                          dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                          strength: float = 1.0):
    """``planted_qkv`` plus a dict saying where the structure was planted.

    info: ``columns`` (B, Hkv, n) long key positions, ``offsets`` list of slash offsets (shared
    by every kv head), ``spans`` list of (start, end) salient key spans, ``kinds`` per query head.
    """
    kv_heads = kv_heads or heads
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if head_dim < 8:
        raise ValueError(f"planted_qkv needs head_dim >= 8, got {head_dim}")
    B, H, Hkv, S, D = batch, heads, kv_heads, seq_len, head_dim
    G = H // Hkv
    gen = torch.Generator(device=device).manual_seed(seed)
    f32 = torch.float32

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=f32)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, device=device, dtype=f32)

    def unit(*shape):
        x = randn(*shape)
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)

    L = math.log(max(S, 2))
    st = float(strength)
    hw = {name: w.view(1, Hkv, G, 1) for name, w in _head_weights(H, Hkv, device).items()}
    # Head-dim layout: [rope | retrieval | column | global]. Terms live in disjoint dims; the only
    # cross-talk is what the rotations and retrieval codes do among themselves (far-field
    # noise of a rotation ~ peak / sqrt(rope dims), the price of any rank-limited kernel).
    n_rope = max(1, (5 * D) // 16)                # rotation pairs (local window and slashes)
    r0, r1 = 0, 2 * n_rope
    x0, x1 = r1, D - 2                            # retrieval directions (>= 1 dim for D >= 8)
    col_dim, g_dim = D - 2, D - 1

    # Logit-unit tensors; scaled by D ** 0.25 on each side at the end.
    qx = torch.zeros(B, Hkv, G, S, D, device=device, dtype=f32)
    ky = torch.zeros(B, Hkv, S, D, device=device, dtype=f32)
    t = torch.arange(S, device=device, dtype=f32)

    # A little content noise (background logits ~ N(0, 0.1^2) from it).
    ky[..., :x1] += 0.2 * randn(B, Hkv, S, x1)
    qx[..., :x1] += 0.05 * randn(B, Hkv, G, S, x1)

    def rope(pos: torch.Tensor, peak: float) -> torch.Tensor:
        # q_t . k_s = peak * mean_i cos((t - s) theta_i) for theta from 1 down to 1/10: a peak
        # a few tokens wide whose far-field ripple averages out of block means.
        theta = 0.1 ** (torch.arange(n_rope, device=device, dtype=f32) / max(1, n_rope - 1))
        angle = pos[:, None] * theta[None, :]
        return torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1) * math.sqrt(peak / n_rope)

    # Local window (every head) and slash lines (slash heads) share the rotation: rot(t - o) in
    # q meets rot(s) in k at s = t - o, a diagonal at offset o with no extra noise dims.
    ky[..., r0:r1] += rope(t, 1.0)
    local_peak = st * max(1.0, L - 3.0)
    qx[..., r0:r1] += hw["local"][..., None] * rope(t, local_peak ** 2)
    offsets = [o for o in (int(600 + 0.05 * S * rand(1).item()),
                           int(S * (0.2 + 0.2 * rand(1).item()))) if 0 < o < S]
    slash_peak = st * max(0.0, L - 1.0)
    for n, o in enumerate(offsets):
        a = slash_peak * (1.0 if n == 0 else 0.8)
        qx[..., r0:r1] += hw["slash"][..., None] * rope(t - o, a ** 2)

    # Sink (token 0), a salient prefix (the first 128 tokens: a system prompt) and salient
    # spans: rank one along the global direction every query reads.
    qx[..., g_dim] += 1.0
    ky[:, :, 0, g_dim] += st * (L + 4.0)
    ky[:, :, 1:128, g_dim] += st * (max(2.0, L - 4.5) + 0.5 * rand(B, Hkv, 1) - 0.25)
    span_amp = st * max(2.0, L - 5.0)
    n_spans = 1 + round(math.sqrt(S / 2048))
    spans = [(0, min(S, 128))]
    for _ in range(n_spans):
        length = int(192 + 320 * rand(1).item())
        start = int(rand(1).item() * max(1, S - length))
        end = min(S, start + length)
        amp = span_amp + st * (1.5 * rand(B, Hkv, 1) - 1.0)
        ky[:, :, start:end, g_dim] += amp * _taper(start, end, device)[:, 0]
        spans.append((start, end))

    # Vertical columns: single heavy keys every query reads (weight per head).
    qx[..., col_dim] += hw["column"]
    n_cols = min(max(S - 2, 0), 6)
    columns = torch.zeros(B, Hkv, 0, dtype=torch.long, device=device)
    if n_cols:
        columns = 1 + (rand(B, Hkv, n_cols) * (S - 2)).long()
        amp = st * (L - 1.5 + rand(B, Hkv, n_cols) - 0.5)
        ky[..., col_dim].scatter_add_(2, columns, amp)

    # Retrieval: query segment m (of 8) reads one earlier key span through its own direction.
    nx = x1 - x0
    n_seg = 8
    seg = S // n_seg
    retrieval = []
    if seg >= 1 and nx >= 1:
        ret_amp = st * max(2.0, L - 3.5)
        for m in range(2, n_seg):
            w = unit(B, Hkv, 1, nx)
            length = int(192 + 256 * rand(1).item())
            start = int(rand(1).item() * max(1, m * seg - length))
            end = min(start + length, m * seg)
            ky[:, :, start:end, x0:x1] += math.sqrt(ret_amp) * _taper(start, end, device) * w
            retrieval.append((start, end))
            qx[:, :, :, m * seg:(m + 1) * seg, x0:x1] += (
                math.sqrt(ret_amp) * hw["retrieval"][..., None] * w.unsqueeze(2))

    root = D ** 0.25
    q = (qx * root).flatten(1, 2)
    k = ky * root
    v = randn(B, Hkv, S, D)
    info = {"columns": columns, "offsets": offsets, "spans": spans, "retrieval": retrieval,
            "kinds": [_KINDS[h % 4] for h in range(H)]}
    return q.to(dtype), k.to(dtype), v.to(dtype), info
