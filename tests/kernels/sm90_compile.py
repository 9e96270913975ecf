"""Compile Triton kernels for sm_90 on a machine without a GPU (run as a script, with
TRITON_INTERPRET unset: under the interpreter ``triton.jit`` gives interpreted functions).

The interpreter does not check what Triton's compiler checks (a loop-carried variable that
changes type, for one: it broke the vertical/slash probe's first GPU run, RESULTS.md run 66).
Prints one line per kernel, "ok NAME" or "FAIL NAME: reason"; "env-fail: reason" when even a
trivial kernel does not compile here (no ptxas, no CUDA backend).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402


@triton.jit
def _trivial(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)


def compile_sm90(fn, consts: dict, pointers: dict, floats=(), num_warps: int = 4):
    """Compile ``fn`` for sm_90: ints for every argument not named in ``pointers`` (name ->
    Triton pointer type), ``floats`` or ``consts`` (constexpr values)."""
    names = fn.arg_names
    sig = {n: "i32" for n in names}
    sig.update(pointers)
    sig.update({f: "fp32" for f in floats})
    sig.update({c: "constexpr" for c in consts})
    src = ASTSource(fn=fn, signature=sig,
                    constexprs={(names.index(c),): v for c, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps))


def probe_kernels():
    """(name, thunk) for the vertical/slash probe's kernels, both packings and variants."""
    from fp_compile.kernels import vertical_slash as vsm
    from fp_compile.kernels import vertical_slash_skew as sk

    bf = {"q_ptr": "*bf16", "k_ptr": "*bf16"}
    f32 = lambda *names: {n: "*fp32" for n in names}  # noqa: E731
    out = []
    for NP, GP, BN in ((32, 4, 64), (128, 1, 128)):
        c = dict(D=128, DP=128, NP=NP, GP=GP, BN=BN, DOT_PRECISION="tf32")
        out.append((f"_probe_lse_kernel NP={NP} GP={GP}", lambda c=c: compile_sm90(
            sk._probe_lse_kernel, c, {**bf, **f32("m_ptr", "l_ptr")}, ["qk_scale"])))
        c = dict(c, SPLITS_P=64, ROWS=32, DIAGONALS=True)
        out.append((f"_skew_scores_kernel NP={NP} GP={GP}", lambda c=c: compile_sm90(
            sk._skew_scores_kernel, c,
            {**bf, **f32("m_ptr", "l_ptr", "col_ptr", "first_ptr", "second_ptr", "scr_ptr")},
            ["qk_scale"])))
    out.append(("_finalize_kernel", lambda: compile_sm90(
        sk._finalize_kernel, dict(NP=32, BN=64, BSP=128, ONE_ROW=False, SCORES=False,
                                  FLAGS=True),
        {**f32("col_ptr", "first_ptr", "second_ptr", "diag_ptr"), "cflag_ptr": "*i1",
         "dflag_ptr": "*i1"}, ["diag_scale", "threshold"])))
    out.append(("_probe_scores_kernel (gather)", lambda: compile_sm90(
        vsm._probe_scores_kernel, dict(D=128, DP=128, BLOCK=32, DOT_PRECISION="tf32",
                                       DIAGONALS=True),
        {**bf, **f32("lse_ptr", "col_ptr", "first_ptr", "second_ptr")}, ["qk_scale"])))
    return out


def main() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter does not compile")
    try:
        compile_sm90(_trivial, dict(BLOCK=16), {"x_ptr": "*fp32"})
    except Exception as e:  # noqa: BLE001 - the environment, not our kernels
        print(f"env-fail: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return
    for name, thunk in probe_kernels():
        try:
            thunk()
            print(f"ok {name}", flush=True)
        except Exception as e:  # noqa: BLE001 - report every kernel
            print(f"FAIL {name}: {type(e).__name__}: {str(e)[-600:]}", flush=True)


if __name__ == "__main__":
    main()
