"""Compile the attention variants' configs for sm_90 without a GPU (Triton's ahead-of-time
path): does each compile, and how much shared memory does it take? Run with TRITON_INTERPRET
unset.

    python benchmarks/compile_attn_variants.py                     # every bench config
    python benchmarks/compile_attn_variants.py tma_fold:128,64,8,3   # some

A compiler abort kills this process: give one config per call to find which one.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fp_compile.kernels.block_sparse_attention_tma import (VARIANTS,  # noqa: E402
                                                           _bsa_variant_kernel)

POINTERS = {"q_ptr": "*bf16", "o_ptr": "*bf16", "num_ptr": "*i32", "idx_ptr": "*i32"}
SMEM_LIMIT = 232448   # bytes of shared memory a block may use on the H100 / H200


def compile_one(variant: str, tile, D: int = 128, block_size: int = 128):
    bm, bn, warps, stages = tile
    flags = VARIANTS[variant]
    consts = dict(D=D, DP=D, BLOCK_SIZE=block_size, BLOCK_M=bm, BLOCK_N=bn,
                  DOT_PRECISION="tf32", **flags)
    kv = f"tensordesc<bf16[{bn}, {D}]>" if flags["TMA"] else "*bf16"
    names = _bsa_variant_kernel.arg_names
    sig = {n: "i32" for n in names}
    sig.update(POINTERS, k_src=kv, v_src=kv, qk_scale="fp32", **{c: "constexpr" for c in consts})
    src = ASTSource(fn=_bsa_variant_kernel, signature=sig,
                    constexprs={(names.index(c),): val for c, val in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=stages))


def main() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter does not compile")
    if len(sys.argv) > 1:
        names = sys.argv[1:]
    else:
        from bench_attn_variants import config_names
        names = [n for n in config_names() if not n.startswith("default")]
    for name in names:
        variant, tile = name.split(":")
        tile = tuple(int(x) for x in tile.split(","))
        t0 = time.time()
        try:
            k = compile_one(variant, tile)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"{name}: FAIL {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            continue
        ws = "ttg.warp_specialize" in k.asm["ttgir"]
        fits = "fits" if k.metadata.shared <= SMEM_LIMIT else "TOO BIG"
        print(f"{name}: ok {time.time() - t0:.1f} s, shared {k.metadata.shared} B ({fits}), "
              f"warp-specialised {ws}", flush=True)


if __name__ == "__main__":
    main()
