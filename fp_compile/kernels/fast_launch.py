"""Launching a compiled Triton kernel again without ``JITFunction.run``'s per-call binding.

The opaque op (dynamic shapes, the dense fallback, eager calls) launches its kernels from Python
on every call. ``kernel[grid](...)`` then binds and specialises every argument, builds a cache
key and looks the compiled kernel up before it reaches the launcher: 140-330 us of a profiled
call per launch on the H200's host (RESULTS.md run 60), while the GPU waits whenever the call
is synced. Inductor's generated code launches the same kernels through their launchers
directly.

``launch(kernel)[grid](*args, **kwargs)`` does what ``kernel[grid](*args, **kwargs)`` does. The
first launch for a key goes through ``JITFunction.run`` (compiling if needed) and keeps the
compiled kernel it returns. Later launches with the same key call that kernel's launcher as
``JITFunction.run`` does after its binding (the same call in Triton 3.6 and 3.9):
``compiled.run(grid_0, grid_1, grid_2, stream, function, packed_metadata, launch_metadata,
enter_hook, exit_hook, *every parameter's value)``, with no launch metadata (what Triton builds
it for is a hook, and none is set then).

The key holds, exactly, everything the specialisation is a function of, so the kernel launched
is the one ``JITFunction.run`` would pick:
- the current device;
- each constexpr's value and each int's value (Triton looks at an int's divisibility);
- each tensor's dtype and whether its address is 16-byte aligned;
- each host tensor descriptor's dtype, shape, strides, block shape and base alignment;
- the launch options (num_warps, num_stages).

Floats are keyed by type only (Triton does not specialise on them). An argument of another type
makes the call take ``JITFunction.run``.

One check of ``JITFunction.run`` is not repeated: that the module-level globals a kernel reads
still hold the values it was compiled with (it raises if one changed). The kernels here read
only constants that nothing reassigns.

If the launcher refuses the cached call (a TypeError, raised while it parses its arguments,
before it launches: a Triton whose launcher takes another call), that launch and every later
one of the kernel take ``JITFunction.run``.

``JITFunction.run`` is always taken in Triton's interpreter, while torch.compile traces
(``launcher`` hands out ``wrap_triton`` instead), with launch hooks set (profilers read their
metadata), and for anything that is not a plain ``JITFunction`` (autotuners).
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import torch

_MISSING = object()
_ENTRIES = 256          # compiled kernels kept per kernel (one per distinct key, LRU)
_EXACT = (int, bool, str, type(None))


def _idle_hooks():
    """Triton's launch hooks (enter, exit) when none would run (None, or an empty hook chain
    as Triton 3.6 and 3.9 keep), to pass on as JITFunction.run does; None when a hook is set
    (a profiler wants the launch metadata) or there is no knob to read (an older Triton)."""
    import triton

    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is None:
        return None
    hooks = (getattr(runtime, "launch_enter_hook", None),
             getattr(runtime, "launch_exit_hook", None))
    if any(h is not None and getattr(h, "calls", True) for h in hooks):
        return None
    return hooks


def _current_device() -> int:
    """The current CUDA device's index (CUDA is initialised: a kernel was compiled for it)."""
    return torch._C._cuda_getDevice()


def _raw_stream(device: int) -> int:
    """The current stream of ``device`` as the launcher takes it: what Inductor's generated
    code passes (``torch.cuda.current_stream().cuda_stream`` builds a Stream object first)."""
    return torch._C._cuda_getCurrentRawStream(device)


def _descriptor_type():
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:     # pragma: no cover - Triton without host descriptors
        return ()
    return TensorDescriptor


class FastLaunch:
    """``kernel`` (a ``triton.runtime.jit.JITFunction``) with cached launches; see the module."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.names = [p.name for p in kernel.params]
        self.name_set = frozenset(self.names)
        self.constexpr = [p.is_constexpr for p in kernel.params]
        self.defaults = [p.default if p.has_default else _MISSING for p in kernel.params]
        self.compiled: OrderedDict = OrderedDict()
        self.hits = 0       # launches from the cache (for tests and benchmarks)
        self.off = False    # set when the launcher refused the cached call (another Triton)
        self.descriptor = _descriptor_type()

    def __getitem__(self, grid):
        if callable(grid):      # a grid computed from the launch's meta-parameters
            return self.kernel[grid]
        return functools.partial(self._launch, tuple(grid))

    def values(self, args, kwargs):
        """Every parameter's value in order (positional, keyword, default), as JITFunction.run
        passes them to the launcher; None when one is missing (Triton then raises)."""
        vals = list(args)
        for name, default in zip(self.names[len(args):], self.defaults[len(args):]):
            value = kwargs.get(name, default)
            if value is _MISSING:
                return None
            vals.append(value)
        return vals

    def key(self, vals, kwargs, device: int):
        """What the specialisation depends on (module docstring); None for an argument of a
        type not covered. ``device``: the current device's index."""
        parts = [device]
        append = parts.append
        for value, is_constexpr in zip(vals, self.constexpr):
            kind = type(value)
            if is_constexpr or kind in _EXACT:
                append(value)
            elif kind is float:
                append(float)
            elif isinstance(value, torch.Tensor):
                append((value.dtype, value.data_ptr() % 16 == 0))
            elif self.descriptor and isinstance(value, self.descriptor):
                append((value.base.dtype, tuple(value.shape), tuple(value.strides),
                        tuple(value.block_shape), value.base.data_ptr() % 16 == 0))
            else:
                return None
        names = self.name_set
        options = tuple(sorted(item for item in kwargs.items() if item[0] not in names))
        return tuple(parts), options

    def _launch(self, grid, *args, **kwargs):
        vals = None if self.off else self.values(args, kwargs)
        device = _current_device()
        key = None if vals is None else self.key(vals, kwargs, device)
        try:
            compiled = None if key is None else self.compiled.get(key)
        except TypeError:   # an unhashable constexpr value: no key
            key = compiled = None
        hooks = _idle_hooks()
        if compiled is None or hooks is None:
            compiled = self.kernel[grid](*args, **kwargs)
            if key is not None and compiled is not None and hasattr(compiled, "run"):
                self.compiled[key] = compiled
                if len(self.compiled) > _ENTRIES:
                    self.compiled.popitem(last=False)
            return compiled
        self.compiled.move_to_end(key)
        g0, g1, g2 = (grid + (1, 1))[:3]
        stream = _raw_stream(device)
        try:
            compiled.run(g0, g1, g2, stream, compiled.function, compiled.packed_metadata, None,
                         *hooks, *vals)
        except TypeError:
            # The launcher parses its arguments before it launches: a Triton whose launcher
            # takes another call refuses this one here. Take JITFunction.run from now on.
            self.off = True
            self.compiled.clear()
            return self.kernel[grid](*args, **kwargs)
        self.hits += 1
        return compiled


_LAUNCHERS: dict = {}


def launch(kernel):
    """``kernel`` with cached launches (``FastLaunch``) when it is a compiled-mode
    ``JITFunction``; else ``kernel`` itself."""
    from triton.runtime.jit import JITFunction

    if not isinstance(kernel, JITFunction):
        return kernel
    fast = _LAUNCHERS.get(kernel)
    if fast is None:
        try:
            fast = FastLaunch(kernel)
        except AttributeError:  # a JITFunction without the parameter list read here
            fast = kernel
        _LAUNCHERS[kernel] = fast
    return fast
