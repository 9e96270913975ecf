"""The eligibility rules: the pass's skip reasons and the eager check_inputs, one rule set."""

import pytest
import torch

from fp_compile import api
from fp_compile.passes.eligibility import check_inputs, sdpa_skip_reason
from tests.passes.graphs import meta


@pytest.mark.parametrize("q, k, v, kwargs, reason", [
    (meta(1, 4, 32, 16), meta(1, 2, 32, 16), meta(1, 2, 32, 16), {}, "GQA without enable_gqa"),
    (meta(1, 6, 32, 16), meta(1, 4, 32, 16), meta(1, 4, 32, 16), {"enable_gqa": True},
     "query heads not a provable multiple of kv heads"),
    (meta(1, 4, 32, 16), meta(1, 4, 32, 8), meta(1, 4, 32, 8), {}, "head dims differ"),
    (meta(4, 32, 16), meta(4, 32, 16), meta(4, 32, 16), {}, "not 4-D (B, H, S, D)"),
    (meta(1, 4, 32, 16, dtype=torch.int32),) * 3 + ({}, "not a floating dtype"),
    (meta(1, 4, 32, 16), meta(1, 4, 32, 16, dtype=torch.float16),
     meta(1, 4, 32, 16), {}, "q/k/v dtypes differ"),
    (meta(2, 4, 32, 16), meta(1, 4, 32, 16), meta(1, 4, 32, 16), {},
     "batch sizes differ (broadcast)"),
    (meta(1, 4, 32, 16, grad=True), meta(1, 4, 32, 16), meta(1, 4, 32, 16), {}, "requires grad"),
    (meta(1, 4, 32, 16), meta(1, 4, 32, 16), meta(1, 4, 32, 16), {"dropout_p": 0.1},
     "dropout_p=0.1 (training)"),
    (meta(1, 4, 32, 16), meta(1, 4, 32, 16), meta(1, 4, 32, 16), {"is_causal": False},
     "not causal"),
    (meta(1, 4, 1, 16), meta(1, 4, 32, 16), meta(1, 4, 32, 16), {}, "decode (q_len 1)"),
    (meta(1, 4, 32, 16), meta(1, 4, 32, 16), meta(1, 4, 30, 16), {},
     "key and value lengths differ"),
    (meta(1, 4, 32, 16), meta(1, 2, 32, 16), meta(1, 4, 32, 16), {"enable_gqa": True},
     "key and value head counts differ"),
    (meta(1, 4, 32, 16), meta(1, 4, 32, 16), meta(1, 4, 32, 16), {"attn_mask": meta(32, 32)},
     "attn_mask given"),
    (meta(1, 4, 32, 16), meta(1, 4, 32, 16), meta(1, 4, 32, 16), {"scale": torch.tensor(0.1)},
     "scale is not a constant"),
    (meta(1, 4, 32, 16), "k", meta(1, 4, 32, 16), {}, "inputs without tensor metadata"),
])
def test_skip_reasons(q, k, v, kwargs, reason):
    kwargs = {"is_causal": True, **kwargs}
    assert sdpa_skip_reason(q, k, v, **kwargs) == reason


def test_eligible_call_has_no_skip_reason():
    assert sdpa_skip_reason(meta(2, 8, 33, 64), meta(2, 2, 33, 64), meta(2, 2, 33, 64),
                            is_causal=True, enable_gqa=True, scale=0.2) is None


def _cpu(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype)


# Bad eager inputs, several with more than one fault: the first fault must be the one reported.
EAGER_CASES = {
    "not a tensor": ((_cpu(1, 4, 8, 16), [1.0], None), {}),
    "int query": ((_cpu(1, 4, 8, 16, dtype=torch.int32), _cpu(1, 4, 8, 16),
                   _cpu(1, 4, 8, 16)), {}),
    "3-D int key": ((_cpu(1, 4, 8, 16), _cpu(4, 8, 16, dtype=torch.int64), None), {}),
    "3-D value": ((_cpu(1, 4, 8, 16), _cpu(1, 4, 8, 16), _cpu(4, 8, 16)), {}),
    "dtype": ((_cpu(1, 4, 8, 16), _cpu(1, 4, 8, 16, dtype=torch.float64),
               _cpu(1, 4, 8, 16)), {}),
    "device": ((_cpu(1, 4, 8, 16), _cpu(1, 4, 8, 16), meta(1, 4, 8, 16)), {}),
    "batch and length": ((_cpu(1, 4, 8, 16), _cpu(2, 4, 6, 16), _cpu(2, 4, 6, 16)), {}),
    "head dim": ((_cpu(1, 4, 8, 16), _cpu(1, 4, 8, 32), _cpu(1, 4, 8, 32)), {}),
    "key length": ((_cpu(1, 4, 8, 16), _cpu(1, 4, 6, 16), _cpu(1, 4, 6, 16)), {}),
    "value length": ((_cpu(1, 4, 8, 16), _cpu(1, 4, 8, 16), _cpu(1, 4, 6, 16)), {}),
    "kv heads": ((_cpu(1, 4, 8, 16), _cpu(1, 2, 8, 16), _cpu(1, 4, 8, 16)), {}),
    "gqa flag": ((_cpu(1, 4, 8, 16), _cpu(1, 2, 8, 16), _cpu(1, 2, 8, 16)),
                 {"enable_gqa": False}),
    "not a multiple": ((_cpu(1, 6, 8, 16), _cpu(1, 4, 8, 16), _cpu(1, 4, 8, 16)), {}),
    "zero kv heads": ((_cpu(1, 4, 8, 16), _cpu(1, 0, 8, 16), _cpu(1, 0, 8, 16)), {}),
    "empty": ((_cpu(1, 4, 0, 16), _cpu(1, 4, 0, 16), _cpu(1, 4, 0, 16)), {}),
    "q and k only": ((_cpu(1, 4, 8, 16), _cpu(1, 3, 8, 16), None), {}),
}


def _raised(fn, args, kwargs):
    try:
        fn(*args, **kwargs)
    except (TypeError, ValueError) as e:
        return type(e), str(e)
    return None


@pytest.mark.parametrize("case", list(EAGER_CASES))
def test_check_inputs_raises_what_the_eager_api_raises(case):
    """The shared rule set reproduces api.check_inputs: same exception type, same message."""
    args, kwargs = EAGER_CASES[case]
    want = _raised(api.check_inputs, args, kwargs)
    assert want is not None, f"{case}: not a bad input"
    assert _raised(check_inputs, args, kwargs) == want


@pytest.mark.parametrize("q, k, v, kwargs", [
    (_cpu(1, 8, 8, 16), _cpu(1, 2, 8, 16), _cpu(1, 2, 8, 16), {}),
    (_cpu(2, 4, 1, 64, dtype=torch.bfloat16),) * 3 + ({"enable_gqa": False},),
    (_cpu(1, 4, 8, 16), _cpu(1, 4, 8, 16), None, {}),
])
def test_check_inputs_accepts_what_the_op_takes(q, k, v, kwargs):
    check_inputs(q, k, v, **kwargs)
