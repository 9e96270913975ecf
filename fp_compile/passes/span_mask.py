"""The span prover: is an SDPA ``attn_mask`` the causal mask of a padded or offset call?

Hugging Face models build one mask for a padded batch and for a continuation over a cache:
``kv_idx <= q_idx + offset`` (queries at the end of the keys, offset = S_kv - S_q) and, with a
2-D ``attention_mask`` input, ``& attention_mask[b, kv_idx]``. flash_prefill serves exactly that
call with a span (``fp_compile.spans``): the op takes the 2-D mask itself as ``key_mask`` and puts
the queries at the last S_q key positions.

``span_mask_reason(mask, q, k)`` decides it the way ``causal_mask`` does, without a guard: the
mask's subgraph may read sizes and at most one tensor input, a (batch, S_kv) integer or bool
tensor (the padding mask); nothing random, nothing written in place. It is evaluated at the
``causal_mask`` trial sizes and, for each, at several padding masks (none, left, right, holes, a
row with no valid key), and must equal ``(j <= i + S_kv - S_q) & (key_mask[b, j] != 0)``
every time (boolean, or additive 0 / -inf or finfo.min). Masks with holes are checked so that a
mask that only agrees on contiguous padding does not pass; the op itself then refuses holes at
run time (``spans.span_of``).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .causal_mask import (_NotFromSizes, _NotProvable, _check_not_mutated, _concrete, _evaluate,
                          _mask_subgraph, _mask_trials)
from .fx_utils import FLOAT_DTYPES, is_float_tensor, known_eq, meta_value


class SpanMask(NamedTuple):
    """A proven mask: the tensor inputs the op takes as ``key_mask`` (None: no padding) and
    ``q_pos`` (None: the queries at the end), and how the call reads in the report ("padded",
    "offset", "cache buffer", joined by " + ")."""

    key_mask: Optional[torch.fx.Node]
    q_pos: Optional[torch.fx.Node]
    form: str


def _real_value(node: torch.fx.Node) -> Optional[torch.Tensor]:
    """The real tensor behind a dynamo placeholder (a module buffer), if dynamo kept it."""
    arg = node.meta.get("grapharg")
    example = getattr(arg, "example", None) if arg is not None else None
    if isinstance(example, torch.Tensor) and not isinstance(example, torch.nn.Parameter):
        return example
    return None


def _padding_trials(B: int, S: int) -> list[torch.Tensor]:
    """Key masks (B, S) int64 the mask is evaluated at: none, left, right, holes, empty rows."""
    gen = torch.Generator().manual_seed(0)
    j = torch.arange(S)
    b = torch.arange(B)[:, None]
    cut = (b * 7 + 1) % max(S, 1)
    trials = [torch.ones(B, S, dtype=torch.int64),
              (j[None, :] >= cut).long(),                      # left padding
              (j[None, :] < S - cut).long(),                   # right padding
              torch.randint(0, 2, (B, S), generator=gen)]      # holes
    empty = trials[1].clone()
    empty[0] = 0                                               # a row with no valid key
    return trials + [empty]


def _matches(value: torch.Tensor, expected: torch.Tensor) -> bool:
    """value (broadcastable to (B, H?, S_q, S_kv)) is ``expected`` (B, S_q, S_kv) bool."""
    if value.dim() < 2 or tuple(value.shape[-2:]) != tuple(expected.shape[-2:]):
        return False
    while value.dim() < 4:
        value = value.unsqueeze(0)
    if value.shape[0] not in (1, expected.shape[0]):
        return False
    want = expected[:, None].expand(expected.shape[0], value.shape[1], *expected.shape[1:])
    value = value.expand_as(want)
    if value.dtype == torch.bool:
        return bool((value == want).all())
    if value.dtype not in FLOAT_DTYPES:
        return False
    blocked = (value == float("-inf")) | (value == torch.finfo(value.dtype).min)
    return bool(torch.where(want, value == 0, blocked).all())


def span_mask_reason(mask: torch.fx.Node, q, k) -> tuple[Optional[str], Optional[SpanMask]]:
    """(None, SpanMask) if ``mask`` provably is the causal mask of q (B, H, S_q, D) over k
    (B, Hkv, S_kv, D) with the queries at the end and at most a padding mask; else (why not,
    None). Nothing adds a guard."""
    m = meta_value(mask)
    if not (isinstance(m, torch.Tensor) and (m.dtype == torch.bool or is_float_tensor(m))):
        return "attn_mask given", None
    data: set = set()
    try:
        nodes, leaves = _mask_subgraph(mask, data)
        _check_not_mutated(mask, nodes, leaves)
    except _NotFromSizes:
        return "attn_mask given", None
    except _NotProvable as e:
        return f"attn_mask not provably causal ({e})", None
    B, S_q, S_kv = q.shape[0], q.shape[2], k.shape[2]
    key_mask = q_pos = None
    tables = {}
    for node in sorted(data, key=lambda n: n.name):
        t = meta_value(node)
        integer = not t.is_floating_point() and not t.is_complex()
        if (key_mask is None and integer and t.dim() == 2 and known_eq(t.shape[0], B)
                and known_eq(t.shape[1], S_kv)):
            key_mask = node
        elif (q_pos is None and integer and t.dtype != torch.bool and t.dim() == 1
              and known_eq(t.shape[0], S_q)):
            q_pos = node
        elif _real_value(node) is not None and _real_value(node).numel() <= 1 << 26:
            # a module buffer (gpt-fast's causal_mask): read as it is now, and not written in
            # the graph (checked above); the pass assumes the module never rewrites it.
            tables[node] = _real_value(node)
        else:
            return (f"attn_mask reads {node.name}, not a padding mask, positions or a "
                    "module buffer (attn_mask given)"), None
    out = (B, q.shape[1], S_q, S_kv)
    if not 2 <= m.dim() <= 4 or not all(
            known_eq(a, b) or (i >= 2 and known_eq(a, 1))
            for i, (a, b) in enumerate(zip(reversed(m.shape), reversed(out)))):
        return "attn_mask not provably causal (shape)", None
    for index, subs in enumerate(_mask_trials(nodes, leaves, q, k)):
        try:
            b, sq, skv = (_concrete(x, subs) for x in (B, S_q, S_kv))
            if b * sq * skv * 5 > 1 << 28:
                return "attn_mask not provably causal (too large to check)", None
            # the queries at the end, or (with positions) at the start, middle and end
            starts = sorted({0, (skv - sq) // 2, skv - sq}) if q_pos is not None else [skv - sq]
            pads = _padding_trials(b, skv) if key_mask is not None else [None]
            for p0 in starts:
                pos = torch.arange(sq) + p0
                causal = torch.arange(skv)[None, :] <= pos[:, None]           # (S_q, S_kv)
                for pad in pads:
                    values = dict(tables)
                    if pad is not None:
                        values[key_mask] = pad.to(meta_value(key_mask).dtype)
                    if q_pos is not None:
                        values[q_pos] = pos.to(meta_value(q_pos).dtype)
                    with unset_fake_temporarily(), torch.no_grad():
                        values = {n: t.to(meta_value(n).device) for n, t in values.items()}
                        value = _evaluate(nodes, leaves, subs, values)
                        valid = (torch.ones(b, skv, dtype=torch.bool) if pad is None
                                 else pad != 0)
                        expected = causal[None] & valid[:, None, :]
                        if not _matches(value.cpu(), expected):
                            return "attn_mask not causal (nor causal with padding)", None
        except _NotProvable as e:
            return f"attn_mask not provably causal ({e})", None
        except Exception as e:  # noqa: BLE001  (any failure to evaluate: not proven)
            if tables and index > 0:
                continue          # a buffer of fixed size cannot serve every trial length
            return f"attn_mask not provably causal ({type(e).__name__})", None
    parts = (["padded"] if key_mask is not None else []) + (
        ["cache buffer"] if q_pos is not None
        else [] if known_eq(S_q, S_kv) else ["offset"])
    return None, SpanMask(key_mask, q_pos, " + ".join(parts) or "causal")
