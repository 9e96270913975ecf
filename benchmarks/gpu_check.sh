#!/usr/bin/env bash
# One call on the GPU machine: GPU tests, the kernel benchmark and the demo (time limits per part
# add up to under 10 minutes), a short table last. Full logs and results go under $OUT (or
# ./gpu_out), packed into results.tgz.
#   bash benchmarks/gpu_check.sh                 # tests bench demo
#   bash benchmarks/gpu_check.sh tests bench     # some parts: tests bench guards spans scale accuracy demo
#   bash benchmarks/gpu_check.sh train trained  # train the long-context model, then its benchmark
# Extra arguments for bench_attention.py go in $BENCH_ARGS. Each part has a time limit
# (TEST_TIMEOUT, BENCH_TIMEOUT, GUARDS_TIMEOUT, SPANS_TIMEOUT, SCALE_TIMEOUT, ACC_TIMEOUT,
# DEMO_TIMEOUT, TRAIN_TIMEOUT, TRAINED_TIMEOUT seconds) so one call
# fits in 10 minutes. GUARDS_ARGS / SPANS_ARGS / SCALE_ARGS / TRAIN_ARGS / TRAINED_ARGS: extra
# arguments for bench_guards.py / bench_spans.py / bench_scale.py / fp_compile.demo.train /
# bench_trained.py (which scores the model just trained when "train" ran, else the shipped one).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
parts=${*:-tests bench demo}
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
  || echo "editable install failed (see install.log); running from the source tree"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} | tee "$OUT/env.txt"
summary=()
has() { [[ " $parts " == *" $1 "* ]]; }
if has tests; then
  # Several workers: the time goes into compiling kernels, which is CPU work.
  timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -m gpu -p no:cacheprovider -rfE \
    -n "${TEST_WORKERS:-14}" --durations=10 ${TEST_PATHS:-tests} > "$OUT/gpu_tests.log" 2>&1
  summary+=("gpu tests: exit $? — $(tail -1 "$OUT/gpu_tests.log")")
  grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -20
fi
if has bench; then
  # shellcheck disable=SC2086
  timeout "${BENCH_TIMEOUT:-220}" python3 benchmarks/bench_attention.py --out "$OUT" \
    ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
  summary+=("bench: exit $?")
fi
if has guards; then
  timeout "${GUARDS_TIMEOUT:-300}" python3 benchmarks/bench_guards.py --out "$OUT" \
    ${GUARDS_ARGS:-} > "$OUT/guards.log" 2>&1
  summary+=("guards: exit $?")
  tail -32 "$OUT/guards.log"
fi
if has spans; then
  # shellcheck disable=SC2086
  timeout "${SPANS_TIMEOUT:-240}" python3 benchmarks/bench_spans.py \
    --out "$OUT/bench_spans.json" ${SPANS_ARGS:-} > "$OUT/spans.log" 2>&1
  summary+=("spans: exit $?")
  tail -40 "$OUT/spans.log"
fi
if has scale; then
  # shellcheck disable=SC2086
  timeout "${SCALE_TIMEOUT:-240}" python3 benchmarks/bench_scale.py --out "$OUT" \
    ${SCALE_ARGS:-} > "$OUT/scale.log" 2>&1
  summary+=("scale: exit $?")
  tail -20 "$OUT/scale.log"
fi
if has accuracy; then
  timeout "${ACC_TIMEOUT:-120}" python3 benchmarks/bench_accuracy.py --out "$OUT" \
    > "$OUT/accuracy.log" 2>&1
  summary+=("accuracy: exit $?")
  tail -30 "$OUT/accuracy.log"
fi
if has train; then
  # shellcheck disable=SC2086
  timeout "${TRAIN_TIMEOUT:-420}" python3 -m fp_compile.demo.train --device cuda \
    --out "$OUT/train" ${TRAIN_ARGS:-} > "$OUT/train.log" 2>&1
  summary+=("train: exit $?")
  tail -14 "$OUT/train.log"
fi
if has trained; then
  weights=()
  [[ -f "$OUT/train/longctx.safetensors" ]] && weights=(--weights "$OUT/train/longctx.safetensors")
  # shellcheck disable=SC2086
  timeout "${TRAINED_TIMEOUT:-330}" python3 benchmarks/bench_trained.py --device cuda \
    "${weights[@]}" --json "$OUT/bench_trained.json" ${TRAINED_ARGS:-} > "$OUT/trained.log" 2>&1
  summary+=("trained: exit $?")
  grep -A 14 "^Mean accuracy" "$OUT/trained.log"
fi
if has demo; then
  # DEMO_MODELS: which models the demo builds (auto = Hugging Face when transformers is there).
  for model in ${DEMO_MODELS:-auto}; do
    timeout "${DEMO_TIMEOUT:-90}" python3 -m fp_compile demo --device cuda --model "$model" \
      --no-progress --plot "$OUT/demo_mask_$model.png" > "$OUT/demo_$model.log" 2>&1
    summary+=("demo ($model): exit $?")
    tail -22 "$OUT/demo_$model.log"
  done
fi
if has bench; then
  grep -v '^{' "$OUT/bench.log" | tail -30
fi
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
# At most 8 files come back from the GPU machine: pack the rest into one archive.
( cd "$OUT" && tar czf results.tgz --exclude results.tgz --exclude summary.txt ./* \
  && find . -maxdepth 1 -type f ! -name results.tgz ! -name summary.txt \
       ! -name bench_attention.json ! -name bench_guards.json -delete ) || true
