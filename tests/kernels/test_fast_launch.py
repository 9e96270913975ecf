"""kernels.fast_launch: cached launches of compiled Triton kernels.

CPU: the interpreter has no compiled kernels, so the logic runs against a stand-in with
JITFunction's interface (``params``, ``kernel[grid](...)`` returning an object with a launcher
``run``): which calls take JITFunction.run, and that a cached launch passes the launcher exactly
what JITFunction.run passes (every parameter's value, in order, defaults filled). GPU-marked:
real kernels launched twice, the second time from the cache, against the uncached launch.
"""

import inspect
import math

import pytest
import torch
import triton.language as tl

from fp_compile.kernels import fast_launch as fl
from tests.helpers import gpu


def body(x_ptr, y_ptr, n, scale, BLOCK: tl.constexpr, FLAG: tl.constexpr = False,
         EXTRA: tl.constexpr = 3):
    pass


class Param:
    def __init__(self, p):
        self.name = p.name
        self.is_constexpr = "constexpr" in str(p.annotation)
        self.has_default = p.default is not inspect.Parameter.empty
        self.default = p.default


class Compiled:
    function = "function-handle"
    packed_metadata = "packed"

    def __init__(self):
        self.calls = []

    def run(self, *args):
        self.calls.append(args)


class StandIn:
    """JITFunction's interface as FastLaunch uses it."""

    def __init__(self):
        self.params = [Param(p) for p in inspect.signature(body).parameters.values()]
        self.slow = []
        self.compiled = Compiled()

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            bound = inspect.signature(body).bind(*args, **{k: v for k, v in kwargs.items()
                                                          if k not in ("num_warps", "num_stages")})
            bound.apply_defaults()
            self.slow.append((grid, list(bound.arguments.values())))
            return self.compiled
        return run


class Stream:
    cuda_stream = 1234


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(fl, "_current_device", lambda: 0)
    monkeypatch.setattr(fl, "_raw_stream", lambda device: Stream.cuda_stream)


def test_second_launch_passes_the_launcher_what_jitfunction_run_would(fake_cuda):
    k = StandIn()
    fast = fl.FastLaunch(k)
    x, y = torch.randn(64), torch.randn(64)
    fast[(4, 2)](x, y, 64, 0.5, BLOCK=16, num_warps=4)
    assert len(k.slow) == 1 and not k.compiled.calls
    fast[(4, 2)](x, y, 64, 0.25, BLOCK=16, num_warps=4)       # float changed: same key
    assert len(k.slow) == 1 and len(k.compiled.calls) == 1
    call = k.compiled.calls[0]
    assert call[:7] == (4, 2, 1, 1234, "function-handle", "packed", None)
    assert len(call[7:9]) == 2 and not any(getattr(h, "calls", None) for h in call[7:9])
    bound = inspect.signature(body).bind(x, y, 64, 0.25, BLOCK=16)
    bound.apply_defaults()
    values = list(bound.arguments.values())
    assert len(call[9:]) == len(values)
    assert all(a is b or a == b for a, b in zip(call[9:], values))


@pytest.mark.parametrize("change", ["int", "constexpr", "default", "dtype", "alignment",
                                    "option"])
def test_a_new_specialisation_takes_jitfunction_run(fake_cuda, change):
    k = StandIn()
    fast = fl.FastLaunch(k)
    x, y = torch.randn(64), torch.randn(64)
    args, kwargs = [x, y, 64, 0.5], dict(BLOCK=16, num_warps=4)
    fast[(1,)](*args, **kwargs)
    if change == "int":
        args[2] = 48
    elif change == "constexpr":
        kwargs["BLOCK"] = 32
    elif change == "default":
        kwargs["EXTRA"] = 4
    elif change == "dtype":
        args[0] = x.double()
    elif change == "alignment":
        args[0] = torch.randn(65)[1:]            # 4 bytes past a 16-byte aligned address
        assert args[0].data_ptr() % 16 and x.data_ptr() % 16 == 0
    else:
        kwargs["num_warps"] = 8
    fast[(1,)](*args, **kwargs)
    assert len(k.slow) == 2 and not k.compiled.calls
    fast[(1,)](*args, **kwargs)                  # now cached under its own key
    assert len(k.slow) == 2 and len(k.compiled.calls) == 1


def test_callable_grids_hooks_and_unknown_arguments_take_jitfunction_run(fake_cuda,
                                                                         monkeypatch):
    import triton

    k = StandIn()
    fast = fl.FastLaunch(k)
    x, y = torch.randn(64), torch.randn(64)
    for _ in range(2):
        fast[lambda meta: (1,)](x, y, 64, 0.5, BLOCK=16)
    for _ in range(2):
        fast[(1,)](x, y, [64], 0.5, BLOCK=16)    # a list: not covered by the key
    for _ in range(2):
        fast[(1,)](x, y, 64, 0.5, BLOCK=[16])    # an unhashable constexpr value
    assert len(k.slow) == 6 and not k.compiled.calls
    fast[(1,)](x, y, 64, 0.5, BLOCK=16)
    hook = triton.knobs.runtime.launch_enter_hook
    if hasattr(hook, "calls"):                   # Triton 3.9: a hook chain
        monkeypatch.setattr(hook, "calls", [print])
    else:
        monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", print)
    fast[(1,)](x, y, 64, 0.5, BLOCK=16)          # cached, but a hook wants its metadata
    assert len(k.slow) == 8 and not k.compiled.calls
    monkeypatch.undo()
    assert not getattr(triton.knobs.runtime.launch_enter_hook, "calls", None)


def test_cache_is_bounded(fake_cuda, monkeypatch):
    monkeypatch.setattr(fl, "_ENTRIES", 3)
    k = StandIn()
    fast = fl.FastLaunch(k)
    x, y = torch.randn(64), torch.randn(64)
    for n in range(5):
        fast[(1,)](x, y, n, 0.5, BLOCK=16)
    assert len(fast.compiled) == 3
    fast[(1,)](x, y, 0, 0.5, BLOCK=16)           # evicted: JITFunction.run again
    assert len(k.slow) == 6


def test_a_launcher_that_refuses_the_cached_call_turns_the_cache_off(fake_cuda):
    """A Triton whose launcher takes another call raises TypeError before launching: that
    launch and every later one go through JITFunction.run."""
    k = StandIn()

    def refuse(*args):
        raise TypeError("launcher takes another call")
    k.compiled.run = refuse
    fast = fl.FastLaunch(k)
    x, y = torch.randn(64), torch.randn(64)
    for _ in range(3):
        fast[(1,)](x, y, 64, 0.5, BLOCK=16)
    assert fast.off and fast.hits == 0 and len(k.slow) == 3


def test_interpreted_kernels_and_autotuners_are_left_as_they_are():
    sentinel = object()
    assert fl.launch(sentinel) is sentinel


@gpu
def test_gpu_cached_launches_equal_uncached_ones():
    """block means and the search, each launched twice through ``launcher``: the second launch
    comes from the cache and writes what an uncached ``kernel[grid]`` launch writes."""
    from fp_compile.kernels import block_means as bm
    from fp_compile.kernels import pattern_search as ps
    from fp_compile.kernels.utils import launcher

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 4, 1000, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 1000, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    fast = launcher(bm._block_means_kernel)
    assert isinstance(fast, fl.FastLaunch)
    first = bm.block_means(k, 64)
    before, hits = len(fast.compiled), fast.hits
    second = bm.block_means(k, 64)
    assert len(fast.compiled) == before >= 1 and fast.hits == hits + 1, (
        "the second launch did not come from the cache", fl._idle_hooks())
    assert torch.equal(first, second)
    sel = [ps.pattern_search(q, k, 64 ** -0.5, 64, 0.1, 1, 1, 1, mass_floor=0.8) for _ in range(3)]
    for got in sel[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got, sel[0]))
    assert launcher(ps._pattern_search_kernel).hits >= 2
    assert math.isfinite(float(first.float().sum()))
