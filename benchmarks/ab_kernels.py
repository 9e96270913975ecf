"""A/B of the kernels of two source trees on the benchmark's inputs (GPU): the key-block means,
the attention on one fixed selection, and cuDNN as the yardstick, in alternating processes.

    git worktree add /tmp/old <commit>
    python benchmarks/ab_kernels.py --roots /tmp/old,. --seq-lens 32768,131072 --rounds 3

Each (round, root) runs in its own process, with that root first on sys.path, so two versions
of ``fp_compile`` never meet in one interpreter; the roots alternate within a round, so clock
and thermal drift fall on both. The selection (the default config's, from the first root) is
computed once per length and handed to every process, so both attend over the same blocks.
Per root: GPU medians (calls queued, ``cuda_time``) of ``block_means`` and of the attention
variant ``dispatch.ATTENTION_VARIANT`` ("tma_fold"), the kept-work rate (diagonal blocks at half,
as bench_attn_variants.py) and its share of cuDNN's dense rate measured in the same process.
Outputs are compared across roots (bit-equal, or the largest difference) before any time is
reported. Inputs: planted_qkv(1, 32, 8, S, 128), seed 0, bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def worker(root: str, S: int, reps: int, work: str, tag: str) -> dict:
    sys.path.insert(0, os.path.abspath(root))
    import torch

    import fp_compile
    from fp_compile import FlashPrefillConfig, select_blocks
    from fp_compile.demo.bench import cuda_time, poison_allocator
    from fp_compile.demo.synthetic import planted_qkv
    from fp_compile.kernels.block_means import block_means
    from fp_compile.kernels.block_sparse_attention_tma import block_sparse_attention_variant

    assert os.path.dirname(os.path.abspath(fp_compile.__file__)).startswith(
        os.path.abspath(root)), fp_compile.__file__
    q, k, v = planted_qkv(1, 32, 8, S, 128, seed=0, dtype=torch.bfloat16, device="cuda")
    bs, D, H = 128, 128, 32
    scale = D ** -0.5
    sel_path = os.path.join(work, f"selection_{S}.pt")
    if not os.path.exists(sel_path):
        sel = select_blocks(q, k, config=FlashPrefillConfig())
        torch.save((sel.kv_num_blocks.cpu(), sel.kv_indices.cpu()), sel_path)
    num, idx = (t.cuda() for t in torch.load(sel_path))
    kept = int(num.sum().item())
    flops = 4 * D * bs * bs * (kept - num.numel() / 2)
    dense_flops = 4 * D * H * S * S / 2
    reps = max(5, min(reps, int(1.6e6 / S)))

    def attend():
        return block_sparse_attention_variant(q, k, v, num, idx, scale, bs, variant="tma_fold")

    def cudnn():
        return torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, False, 0.0, True, False, scale=scale)[0]

    poison_allocator(q)
    out = attend()
    kmean = block_means(k, bs, out_dtype=q.dtype)
    torch.save((out.cpu(), kmean.cpu()), os.path.join(work, f"out_{tag}_{S}.pt"))
    del out
    row = {"root": root, "S": S, "reps": reps,
           "density": kept / (num.numel() * (num.shape[-1] + 1) / 2)}
    row["cudnn_ms"] = cuda_time(cudnn, reps)[0]
    row["attn_ms"] = cuda_time(attend, reps)[0]
    row["means_ms"] = cuda_time(lambda: block_means(k, bs, out_dtype=q.dtype), 4 * reps)[0]
    row["attn_tflops"] = flops / (row["attn_ms"] * 1e-3) / 1e12
    row["cudnn_tflops"] = dense_flops / (row["cudnn_ms"] * 1e-3) / 1e12
    row["share_of_cudnn_rate"] = row["attn_tflops"] / row["cudnn_tflops"]
    return row


def compare(work: str, tags: list[str], S: int) -> dict:
    import torch

    a_out, a_mean = torch.load(os.path.join(work, f"out_{tags[0]}_{S}.pt"))
    b_out, b_mean = torch.load(os.path.join(work, f"out_{tags[1]}_{S}.pt"))
    return {"attn_equal": bool(torch.equal(a_out, b_out)),
            "attn_max_abs_diff": (a_out.float() - b_out.float()).abs().max().item(),
            "attn_finite": bool(b_out.isfinite().all()),
            "means_equal": bool(torch.equal(a_mean, b_mean)),
            "means_max_abs_diff": (a_mean.float() - b_mean.float()).abs().max().item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--roots", required=True, help="two source trees, comma-separated (A,B)")
    p.add_argument("--seq-lens", default="32768,131072")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=None, help="write the rows here as JSON lines")
    p.add_argument("--worker", nargs=4, metavar=("ROOT", "S", "WORK", "TAG"),
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        root, S, work, tag = args.worker
        print(json.dumps(worker(root, int(S), args.reps, work, tag)))
        return
    roots = [os.path.abspath(r) for r in args.roots.split(",")]
    if len(roots) != 2:
        p.error("--roots takes exactly two source trees, A,B")
    tags = ["A", "B"]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for S in (int(s) for s in args.seq_lens.split(",")):
            for r in range(args.rounds):
                order = [0, 1] if r % 2 == 0 else [1, 0]
                for n in order:
                    res = subprocess.run(
                        [sys.executable, os.path.abspath(__file__), "--reps", str(args.reps),
                         "--roots", ",".join(roots), "--worker", roots[n], str(S), work,
                         tags[n]],
                        capture_output=True, text=True, cwd=HERE, check=False,
                        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
                    if res.returncode:
                        sys.exit(f"worker {roots[n]} S={S} failed:\n{res.stderr[-3000:]}")
                    row = json.loads(res.stdout.strip().splitlines()[-1])
                    rows.append({**row, "tag": tags[n], "round": r})
            check = compare(work, tags, S)
            print(f"S={S}: A vs B outputs {json.dumps(check)}")
            rows.append({"S": S, "check": check})
            for n, tag in enumerate(tags):
                mine = [x for x in rows if x.get("tag") == tag and x["S"] == S]
                med = {key: statistics.median(x[key] for x in mine)
                       for key in ("cudnn_ms", "attn_ms", "means_ms", "share_of_cudnn_rate",
                                   "attn_tflops", "cudnn_tflops")}
                print(f"S={S} {tag} ({roots[n]}): density {mine[0]['density']:.4f}; median of "
                      f"{len(mine)} processes: cuDNN {med['cudnn_ms']:.3f} ms "
                      f"({med['cudnn_tflops']:.0f} TFLOP/s), attention {med['attn_ms']:.3f} ms "
                      f"({med['attn_tflops']:.0f} TFLOP/s, {med['share_of_cudnn_rate']:.3f} of "
                      f"cuDNN's rate), block means {1e3 * med['means_ms']:.1f} us")
    if args.out:
        with open(args.out, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
