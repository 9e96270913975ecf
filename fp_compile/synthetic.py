"""Attention inputs with the structure real models show, for tests, benchmarks and the demo.

Random q/k give near-uniform attention, which no sparse method can skip. ``planted_qkv`` plants
what long-context heads are known to do, each as an additive term in q and k so that the logit
``scale * q . k`` gains a known bonus:

* an attention sink at token 0 and a few vertical columns (keys aligned with a query direction
  every query of the head shares),
* a decaying local window (RoPE-style rotation of a shared vector: q_t . k_s = sum of
  cos((t - s) * theta_i), largest at t = s),
* slash lines (the key at t - offset copies a random code of query t),
* block retrieval (a key segment aligned with a later query segment).

Query heads pick different behaviours (``head % 4``: streaming, vertical, slash, retrieval) while
the heads of a GQA group share one k, as in real models.
"""

from __future__ import annotations

import math

import torch


def planted_qkv(batch: int = 1, heads: int = 8, kv_heads: int | None = None, seq_len: int = 4096,
                head_dim: int = 64, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", strength: float = 1.0):
    """Return q (B, H, S, D), k, v (B, Hkv, S, D) with planted attention structure.

    ``strength`` scales every planted logit bonus (0 gives plain noise). The scale the bonuses
    are calibrated for is SDPA's default 1/sqrt(D).
    """
    kv_heads = kv_heads or heads
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    B, H, Hkv, S, D = batch, heads, kv_heads, seq_len, head_dim
    G = H // Hkv
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)

    root = D ** 0.25  # a term x*root in q and y*root in k adds x*y to the scaled logit
    log_s = math.log(S)
    q = 0.3 * randn(B, Hkv, G, S, D)
    k = 0.3 * randn(B, Hkv, S, D)
    v = randn(B, Hkv, S, D)
    t = torch.arange(S, device=device, dtype=torch.float32)
    head_kind = torch.arange(H, device=device).view(Hkv, G) % 4  # per query head
    # Disjoint dimension ranges keep the planted terms from leaking into each other's logits.
    rope_dims, dir_dims, code_dims = slice(0, D // 2), slice(D // 2, 3 * D // 4), slice(3 * D // 4, D)

    def unit(*shape):
        x = randn(*shape)
        return x / x.norm(dim=-1, keepdim=True)

    def per_head(kind: int) -> torch.Tensor:
        # (1, Hkv, G, 1, 1): full weight on heads of that behaviour, a fifth on the others
        return torch.where(head_kind == kind, 1.0, 0.2).view(1, Hkv, G, 1, 1)

    # Bonuses grow with log S so that planted structure keeps its share of the softmax mass
    # against the S background tokens, as attention sinks and local heads do in real models.
    # Local window: a RoPE-rotated vector; q_t . k_s = mean_i cos((t - s) theta_i) decays with
    # distance over a few hundred tokens (frequencies from 1 down to 1/300).
    half = D // 4
    theta = 300.0 ** (-torch.arange(half, device=device, dtype=torch.float32) / half)
    angle = t[:, None] * theta[None, :]
    rot = torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1) / math.sqrt(half)
    local = math.sqrt(strength * 5.0) * root
    q[..., rope_dims] += local * rot
    k[..., rope_dims] += local * rot

    # Attention sink at token 0 (every head) and vertical columns (vertical heads).
    n_dir = D // 4
    sink_dir, col_dir = unit(B, Hkv, 1, n_dir), unit(B, Hkv, 1, n_dir)
    q[..., dir_dims] += root * sink_dir.unsqueeze(2)
    # Salience: a smooth, block-coherent logit offset along the sink direction (most spans
    # dull, a few salient), the coarse structure that block means preserve in real models.
    knots = 3.0 * randn(B, Hkv, S // 64 + 2) - 2.0
    pos = t / 64.0
    lo = pos.floor().long()
    frac = pos - lo
    salience = knots[..., lo] * (1 - frac) + knots[..., lo + 1] * frac  # (B, Hkv, S)
    k[..., dir_dims] += strength * salience[..., None] * root * sink_dir
    k[:, :, 0, dir_dims] += strength * (log_s + 3.0) * root * sink_dir[:, :, 0]
    q[..., dir_dims] += per_head(1) * root * col_dir.unsqueeze(2)
    columns = 1 + torch.randperm(S - 1, generator=gen, device=device)[: min(S - 1, 4)]
    k[:, :, columns, dir_dims] += strength * (log_s - 3.0) * root * col_dir

    # Slash lines: key t - offset carries a random unit code z_t of query t.
    for offset in sorted({max(1, S // 7), max(1, S // 3)}):
        if offset >= S:
            continue
        z = unit(B, Hkv, S - offset, D - 3 * D // 4) * root
        c = math.sqrt(strength * max(log_s - 3.0, 0.0))
        k[:, :, : S - offset, code_dims] += c * z
        q[:, :, :, offset:, code_dims] += c * per_head(2) * z.unsqueeze(2)

    # Block retrieval: query segments aligned with earlier key segments.
    seg = max(1, S // 32)
    for n in range(3):
        a = (2 * n + 1) * S // 10
        b = a + S // 3
        if b + seg > S:
            break
        w = unit(B, Hkv, 1, n_dir) * root
        k[:, :, a:a + seg, dir_dims] += strength * (math.log(S / seg) + 1.0) * w
        q[:, :, :, b:b + seg, dir_dims] += per_head(3) * w.unsqueeze(2)

    q = q.flatten(1, 2)
    return q.to(dtype), k.to(dtype), v.to(dtype)
