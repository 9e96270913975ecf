"""Kernel benchmark: FlashPrefill op vs cuDNN / flash SDPA and FlexAttention on the same blocks.

    python benchmarks/bench_attention.py --out results/          # H200: about 5 minutes

The benchmark itself is ``fp_compile.demo.bench`` (also ``python -m fp_compile bench``), so that
an installed package runs it too; this script keeps the command that RESULTS.md and
gpu_check.sh use working from a clone.
"""

import os
import sys

# From a clone that was not pip-installed, find the package next to this directory.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fp_compile.demo.bench import main  # noqa: E402

if __name__ == "__main__":
    main()
