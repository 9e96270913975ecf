"""What flash_prefill can take: one rule set for the FX/export passes and for the eager API.

The op computes causal attention of q (B, H, S, D) over k, v (B, Hkv, S, D): floating, 4-D, one
dtype and device, equal batch and head dim, S_q == S_kv >= 1, H a multiple of Hkv (GQA only when
asked for). ``input_problems`` walks these rules once, in one order, and yields a ``Problem``
carrying both wordings of each failure:

- ``check_inputs`` (eager, concrete tensors) raises the first one as TypeError/ValueError with a
  message that names the argument;
- ``sdpa_skip_reason`` (the passes, fake tensors with possibly symbolic sizes) returns its short
  reason, after the checks that only an SDPA call has (mask, causality, dropout, scale) and
  before the pass-only gradient check.

Sizes are compared with ``known_eq``: for concrete ints that is plain ==, for symbolic sizes it is
"provably equal without a guard", so a graph is never specialised by asking. The op's own checks
(its fake kernel, while torch.compile traces a call of the op) pass ``provable=False``: there a
call with symbolic sizes is checked the way it will run, with guards where needed.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Optional

import torch

from .fx_utils import FLOAT_DTYPES, is_python_number
from .fx_utils import known_divisible as _known_divisible
from .fx_utils import known_eq as _known_eq


class Problem(NamedTuple):
    """One failed rule: the pass's skip ``reason`` and the eager ``error`` type and ``message``."""

    reason: str
    error: type
    message: str


def _length_reason(S_q, S_kv) -> str:
    """Why S_q == S_kv fails, in the pass's words (decode and chunked prefill named)."""
    if isinstance(S_q, int) and S_q == 1:
        return "decode (q_len 1)"
    if isinstance(S_q, int) and isinstance(S_kv, int):
        return f"S_q != S_kv ({S_q} vs {S_kv}: chunked prefill or KV cache)"
    return "S_q == S_kv not provable without a guard"


def _guarded_eq(a, b) -> bool:
    return bool(a == b)


def _guarded_divisible(a, b) -> bool:
    return bool(a % b == 0)


def input_problems(q, k, v=None, *, gqa: bool, provable: bool = True,
                   span: bool = False) -> Iterator[Problem]:
    """The rules flash_prefill's inputs break, in checking order (lazily: stop at the first).

    q (B, H, S_q, D); k, v (B, Hkv, S_kv, D); ``v`` None checks q and k only (``select_blocks``);
    ``gqa``: H != Hkv is allowed (``enable_gqa``, or a head repeat the pass folded away).
    ``provable``: symbolic sizes must be provably right (the passes); False evaluates them,
    guarding as torch.compile does (the op's own checks). ``span``: the call has a span
    (a key mask, query positions or queries at the end of a longer k / v), so S_q <= S_kv
    is the rule instead of S_q == S_kv.
    """
    known_eq = _known_eq if provable else _guarded_eq
    known_divisible = _known_divisible if provable else _guarded_divisible
    named = [("query", q), ("key", k)] + ([("value", v)] if v is not None else [])
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            yield Problem("inputs without tensor metadata", TypeError,
                          f"{name} must be a Tensor, got {type(t).__name__}")
            return
        if t.dtype not in FLOAT_DTYPES:
            yield Problem("not a floating dtype", TypeError,
                          f"{name} must be a floating tensor "
                          f"(float16/bfloat16/float32/float64), got {t.dtype}")
            return
        if t.dim() != 4:
            yield Problem("not 4-D (B, H, S, D)", ValueError,
                          f"{name} must be 4-D (B, H, S, D), got shape {tuple(t.shape)}")
            return
    # from here on every tensor is 4-D, so the shape rules may index freely
    for name, t in named[1:]:
        if t.dtype != q.dtype:
            yield Problem("q/k/v dtypes differ", TypeError,
                          f"{name} dtype {t.dtype} differs from query dtype {q.dtype}")
        if t.device != q.device:
            yield Problem("q/k/v devices differ", ValueError,
                          f"{name} is on {t.device} but query is on {q.device}")
        if not known_eq(t.shape[0], q.shape[0]):
            yield Problem("batch sizes differ (broadcast)", ValueError,
                          f"batch size of {name} ({t.shape[0]}) differs from query "
                          f"({q.shape[0]})")
        if not known_eq(t.shape[-1], q.shape[-1]):
            yield Problem("head dims differ", ValueError,
                          f"head dim of {name} ({t.shape[-1]}) differs from query "
                          f"({q.shape[-1]})")
        if span:
            if name == "key" and isinstance(q.shape[2], int) and q.shape[2] == 1 and provable:
                yield Problem("decode (q_len 1)", ValueError, "decode")   # the pass only
            elif name == "key" and not _le(q.shape[2], t.shape[2], provable):
                yield Problem("S_q > S_kv", ValueError,
                              f"query has {q.shape[2]} tokens but key only {t.shape[2]}")
            elif name == "value" and not known_eq(t.shape[2], k.shape[2]):
                yield Problem("key and value lengths differ", ValueError,
                              f"key has {k.shape[2]} tokens, value {t.shape[2]}")
        elif not known_eq(t.shape[2], q.shape[2]):
            # key checked first: by the value, S_q == S_kv holds, so only k and v disagree
            reason = (_length_reason(q.shape[2], t.shape[2]) if name == "key"
                      else "key and value lengths differ")
            yield Problem(reason, ValueError,
                          f"prefill needs S_q == S_kv; query has {q.shape[2]} tokens, {name} "
                          f"has {t.shape[2]}")
    if v is not None and not known_eq(v.shape[1], k.shape[1]):
        yield Problem("key and value head counts differ", ValueError,
                      f"key has {k.shape[1]} heads, value {v.shape[1]}")
    H, Hkv = q.shape[1], k.shape[1]
    if not known_eq(H, Hkv) and not gqa:
        yield Problem("GQA without enable_gqa", ValueError,
                      f"query has {H} heads and key {Hkv}; pass enable_gqa=True for "
                      "grouped-query attention")
    # Hkv == 0 first: known_divisible would divide by it
    if known_eq(Hkv, 0) or not (known_eq(H, Hkv) or known_divisible(H, Hkv)):
        yield Problem("query heads not a provable multiple of kv heads", ValueError,
                      f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    if known_eq(q.shape[2], 0):
        yield Problem("empty sequence (S 0)", ValueError, "sequence length must be at least 1")


def _le(a, b, provable: bool) -> bool:
    """a <= b: evaluated with a guard (the op), or, in the pass, not known to be false: the
    masks a span is proven from (a cache's keys, a buffer's rows) hold at least S_q keys, and
    the op's own check raises a ValueError naming the lengths where they do not."""
    if not provable:
        return bool(a <= b)
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return not statically_known_true(a > b)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor] = None, *,
                 enable_gqa: bool = True, provable: bool = True, span: bool = False) -> None:
    """Raise TypeError/ValueError naming the problem for inputs the op cannot take.

    q (B, H, S, D); k, v (B, Hkv, S, D); ``v`` may be omitted (the pattern search reads q, k).
    ``provable=False``: symbolic sizes are evaluated with guards (the op's fake kernel).
    """
    for problem in input_problems(q, k, v, gqa=enable_gqa, provable=provable, span=span):
        raise problem.error(f"flash_prefill: {problem.message}")


def sdpa_skip_reason(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False, *, gqa_folded: bool = False,
                     check_grad: bool = True, span: bool = False) -> Optional[str]:
    """Why an SDPA call with these (fake) arguments cannot become flash_prefill; None if it can.

    q (B, H, S_q, D); k, v (B, Hkv, S_kv, D). ``gqa_folded``: k/v are the un-repeated tensors of
    a head repeat folded away by the pass, so H != Hkv is grouped-query attention even without
    ``enable_gqa``. ``check_grad``: refuse inputs that require grad (the op has no backward;
    export graphs are inference graphs and pass False). ``span``: S_q <= S_kv suffices (the
    caller proved a mask that gives the op its span).
    """
    if attn_mask is not None:
        return "attn_mask given"
    if is_causal is not True:
        return "not causal" if is_causal is False else "is_causal is not a constant"
    if not is_python_number(dropout_p):
        return "dropout_p is not a constant"
    if dropout_p != 0:
        return f"dropout_p={dropout_p} (training)"
    if scale is not None and not is_python_number(scale):
        return "scale is not a constant"
    for problem in input_problems(q, k, v, gqa=bool(enable_gqa or gqa_folded), span=span):
        return problem.reason
    if check_grad and any(t.requires_grad for t in (q, k, v)):
        return "requires grad"
    return None

