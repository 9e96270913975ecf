#!/usr/bin/env bash
# One call on the GPU machine: GPU tests, then the kernel benchmark, a short table last.
#   bash benchmarks/gpu_check.sh [tests|bench|all] [extra bench args...]
# Full logs and results go under $OUT (or ./gpu_out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
what=${1:-all}; shift || true
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
  || echo "editable install failed (see install.log); running from the source tree"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} | tee "$OUT/env.txt"
status=0
if [[ $what == tests || $what == all ]]; then
  timeout ${TEST_TIMEOUT:-280} python3 -m pytest -q -m gpu -p no:cacheprovider -rfE tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
  status=${PIPESTATUS[0]}
fi
if [[ $what == bench || $what == all ]]; then
  timeout ${BENCH_TIMEOUT:-300} python3 benchmarks/bench_attention.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v '^{' 
fi
exit $status
