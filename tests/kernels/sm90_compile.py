"""Compile the project's Triton kernels for sm_90 on a machine without a GPU (run as a script,
with TRITON_INTERPRET unset: under the interpreter ``triton.jit`` gives interpreted functions).

The interpreter does not check what Triton's compiler checks (a loop-carried variable that
changes type, for one: it broke the vertical/slash probe's first GPU run, RESULTS.md run 66).
The kernels are compiled with the arguments our own wrappers launch them with: each wrapper
runs once on small CPU tensors with ``fast_launch.launch`` (where every launch goes, see
``utils.launcher``) replaced by a recorder, so nothing runs; each distinct launch (kernel,
argument types, constexprs, options) is then compiled for sm_90 with ``triton.compile``.
Prints one line per launch, "ok NAME" or "FAIL NAME: reason"; "env-fail: reason" when even a
trivial kernel does not compile here (no ptxas, no CUDA backend).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
         torch.int8: "i8", torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64",
         torch.bool: "i1", torch.float8_e4m3fn: "fp8e4nv", torch.float8_e5m2: "fp8e5"}


@triton.jit
def _trivial(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)


def _compile_trivial():
    src = ASTSource(fn=_trivial, signature={"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},
                    constexprs={(2,): 16})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))


def _arg_type(value):
    if isinstance(value, torch.Tensor):
        return "*" + TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no sm_90 signature for a {type(value).__name__} argument")


class Launch:
    """One recorded launch: the kernel, its signature and constexprs, the launch options."""

    def __init__(self, kernel, args, kwargs):
        configs = getattr(kernel, "configs", None)     # an Autotuner: its first config
        self.fn = kernel.fn if configs else kernel
        kwargs = dict(kwargs)
        if configs:
            kwargs.update(configs[0].all_kwargs())
        params = self.fn.params
        values = list(args)
        for p in params[len(args):]:
            values.append(kwargs.pop(p.name) if p.name in kwargs else p.default)
        self.options = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")}
        self.consts = {p.name: v for p, v in zip(params, values) if p.is_constexpr}
        self.sig = {p.name: "constexpr" if p.is_constexpr else _arg_type(v)
                    for p, v in zip(params, values)}

    def key(self):
        return (self.fn.__name__, tuple(self.sig.items()), tuple(sorted(
            (k, repr(v)) for k, v in self.consts.items())), tuple(sorted(self.options.items())))

    def name(self):
        picked = ", ".join(f"{k}={v}" for k, v in self.consts.items()
                           if k.isupper() and not isinstance(v, str) and v is not None)
        return f"{self.fn.__name__}({picked}; num_warps={self.options.get('num_warps')})"

    def compile(self):
        names = self.fn.arg_names
        src = ASTSource(fn=self.fn, signature=self.sig,
                        constexprs={(names.index(c),): v for c, v in self.consts.items()})
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=self.options)


def record(calls) -> list[Launch]:
    """Run each of ``calls`` (thunks) with the launches recorded instead of run; one Launch per
    distinct kernel specialisation, in order."""
    from fp_compile.kernels import fast_launch

    launches: dict = {}

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launch = Launch(self.kernel, args, kwargs)
                launches.setdefault(launch.key(), launch)
            return run

    saved = fast_launch.launch
    fast_launch.launch = Recorder
    try:
        for call in calls:
            call()
    finally:
        fast_launch.launch = saved
    return list(launches.values())


def kernel_calls():
    """The wrappers' calls, on CPU tensors shaped as the H200 runs them (bf16, D 128, blocks of
    128, 4 query heads per kv head), so their GPU launch settings are the ones compiled: the
    block means, the search (plain; GQA-shared with the mass guard and the detector's flags;
    with a span), the attention (plain, mean correction, a span with the LSE, FP8 with its
    quantisation) and the vertical/slash probe (both variants; the last block's rows, the last
    32, and the last 16: the defaults')."""
    from fp_compile.kernels.block_means import block_means
    from fp_compile.kernels.block_sparse_attention import block_sparse_attention
    from fp_compile.kernels.block_sparse_attention_fp8 import block_sparse_attention_fp8
    from fp_compile.kernels.fp8_quant import quantize_blocks
    from fp_compile.kernels.pattern_search import pattern_search
    from fp_compile.kernels.utils import Span, span_rows
    from fp_compile.kernels.vertical_slash import vertical_slash_flags, vertical_slash_scores

    B, H, Hkv, S, D, bs = 1, 8, 2, 1024, 128, 128
    M = S // bs
    q = torch.randn(B, H, S, D, dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, S, D, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    num = torch.full((B, H, M), 2, dtype=torch.int32)
    idx = torch.zeros(B, H, M, M, dtype=torch.int32)
    flags = (torch.zeros(B, H, M, dtype=torch.uint8),) * 2
    sq = 256                                            # a span: 256 queries over the keys
    span = Span(torch.tensor([S - sq], dtype=torch.int32), torch.zeros(B, dtype=torch.int32),
                torch.full((B,), S, dtype=torch.int32))
    n = span_rows(sq, bs)
    qs = q[:, :, :sq]
    num_s = torch.full((B, H, n), 2, dtype=torch.int32)
    idx_s = torch.zeros(B, H, n, M, dtype=torch.int32)
    lse = torch.empty(B, H, sq, dtype=torch.float32)

    def fp8():   # the quantisation launches are recorded too
        q8, k8 = quantize_blocks(q, bs), quantize_blocks(k, bs)
        v8 = quantize_blocks(v, bs, transpose=True)
        block_sparse_attention_fp8(q8, k8, v8, num, idx, 0.09, bs, torch.empty_like(q))

    return [
        lambda: block_means(k, bs, out_dtype=q.dtype),
        lambda: block_means(k, bs, v),
        lambda: pattern_search(q, k, 0.09, bs, 0.1, 1, 2, 1),
        lambda: pattern_search(q, k, 0.09, bs, 0.1, 1, 2, 1, gqa_shared=True, mass_floor=0.5,
                               return_mass=True, vs_blocks=flags),
        lambda: pattern_search(qs, k, 0.09, bs, 0.1, 1, 2, 1, span=span),
        lambda: block_sparse_attention(q, k, v, num, idx, 0.09, bs),
        lambda: block_sparse_attention(q, k, v, num, idx, 0.09, bs, mean_correction=True),
        lambda: block_sparse_attention(qs, k, v, num_s, idx_s, 0.09, bs, span=span, lse=lse),
        fp8,
        lambda: vertical_slash_flags(q, k, 0.09, bs, 0.01, True, variant="skew"),
        lambda: vertical_slash_flags(q, k, 0.09, bs, 0.01, True, variant="skew", n_rows=32,
                                     flag_dtype=torch.uint8),
        lambda: vertical_slash_flags(q, k, 0.09, bs, 0.015, True, variant="skew", n_rows=16,
                                     flag_dtype=torch.uint8),       # the defaults' probe
        lambda: vertical_slash_scores(q, k, 0.09, bs, variant="skew", n_rows=32),
        lambda: vertical_slash_scores(q, k, 0.09, bs, variant="gather"),
    ]


def main() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter does not compile")
    try:
        _compile_trivial()
    except Exception as e:  # noqa: BLE001 - the environment, not our kernels
        print(f"env-fail: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return
    for launch in record(kernel_calls()):
        try:
            launch.compile()
            print(f"ok {launch.name()}", flush=True)
        except Exception as e:  # noqa: BLE001 - report every kernel
            print(f"FAIL {launch.name()}: {type(e).__name__}: {str(e)[-600:]}", flush=True)


if __name__ == "__main__":
    main()
