"""Interim: the eager input checks (to be merged with the pass's eligibility rules)."""

from __future__ import annotations

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None, *,
                 enable_gqa: bool = True) -> None:
    """Raise TypeError/ValueError naming the problem for inputs the op cannot take."""
    named = [("query", q), ("key", k)] + ([("value", v)] if v is not None else [])
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"flash_prefill: {name} must be a Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"flash_prefill: {name} must be a floating tensor "
                            f"(float16/bfloat16/float32/float64), got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"flash_prefill: {name} must be 4-D (B, H, S, D), got shape "
                             f"{tuple(t.shape)}")
    for name, t in named[1:]:
        if t.dtype != q.dtype:
            raise TypeError(f"flash_prefill: {name} dtype {t.dtype} differs from query dtype "
                            f"{q.dtype}")
        if t.device != q.device:
            raise ValueError(f"flash_prefill: {name} is on {t.device} but query is on {q.device}")
        if t.shape[0] != q.shape[0]:
            raise ValueError(f"flash_prefill: batch size of {name} ({t.shape[0]}) differs from "
                             f"query ({q.shape[0]})")
        if t.shape[-1] != q.shape[-1]:
            raise ValueError(f"flash_prefill: head dim of {name} ({t.shape[-1]}) differs from "
                             f"query ({q.shape[-1]})")
        if t.shape[2] != q.shape[2]:
            raise ValueError(f"flash_prefill: prefill needs S_q == S_kv; query has "
                             f"{q.shape[2]} tokens, {name} has {t.shape[2]}")
    if v is not None and v.shape[1] != k.shape[1]:
        raise ValueError(f"flash_prefill: key has {k.shape[1]} heads, value {v.shape[1]}")
    H, Hkv = q.shape[1], k.shape[1]
    if H != Hkv and not enable_gqa:
        raise ValueError(f"flash_prefill: query has {H} heads and key {Hkv}; pass "
                         "enable_gqa=True for grouped-query attention")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"flash_prefill: query heads ({H}) must be a multiple of key/value "
                         f"heads ({Hkv})")
    if q.shape[2] == 0:
        raise ValueError("flash_prefill: sequence length must be at least 1")
