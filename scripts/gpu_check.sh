#!/usr/bin/env bash
# The GPU check: one prepared run for a machine with an NVIDIA GPU, under 8 minutes in all (each step
# has its own time limit; together they stay under 8 minutes even if every step hits its limit).
#
# Runs the `gpu`-marked tests (those of the compiled update apart), `mtrl bench update` eager and
# compiled as CUDA graphs (`--compile reduce-overhead`), `mtrl bench train` on MT10 and MT50 (mean and
# cagrad, serial and overlapped; MT10 cagrad also with its update compiled as CUDA graphs), `mtrl bench env` on MT10, and a short MT10 training run on the GPU.
# Every record goes to ${OUT:-gpu_check_out}/ as JSON (summary.json lists each step's exit code and
# seconds). CI never runs it: CI has no GPU.
#
# Such a machine may reach no package registry: it is expected to have Python with a CUDA build of
# torch (and numpy, scipy, tensorboard, pytest). The rest travels as wheels: run
# `bash scripts/fetch_gpu_wheels.sh` first (fills .whl/), carry .whl/ along, and this script installs
# them with --no-index into a private directory (only if the interpreter lacks them). Where pip can reach a registry, `pip install -e .`
# works as well. Set PYTHON to choose the interpreter; GPU_CHECK_DEVICE=cpu runs the same steps on the
# CPU with tiny sizes (a rehearsal of the script itself, used by the test suite).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
PY=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
mkdir -p "$OUT"

if ! "$PY" -c "import metaworld, gymnasium, omegaconf" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    SITE=${GPU_CHECK_SITE:-/tmp/mtrl-gpu-site}
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || { echo "gpu_check: installing the wheels in .whl/ failed" >&2; exit 2; }
    export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export MUJOCO_GL=${MUJOCO_GL:-egl}

if [ "$DEVICE" = cuda ]; then
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || { echo "gpu_check: torch sees no CUDA device; set GPU_CHECK_DEVICE=cpu for a CPU rehearsal" >&2; exit 2; }
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
    STEPS=200; MT50_STEPS=100; TASKS=10,50; TRAIN_STEPS=1000; TRAIN_WARMUP=300; ENV_STEPS=500; ENV_REPEATS=3; SIZES=()
    COMPILE=none,reduce-overhead; UPDATE_SIZES=(); LIMIT_SCALE=1
else  # a rehearsal: the same steps, sizes that finish in seconds on a CPU (the compiled update traced, not built)
    STEPS=4; MT50_STEPS=4; TASKS=2; TRAIN_STEPS=60; TRAIN_WARMUP=30; ENV_STEPS=30; ENV_REPEATS=1
    SIZES=(--set agent.hidden_sizes=[16,16] --set train.batch_per_task=4)
    COMPILE=none; UPDATE_SIZES=(--hidden 16,16 --batch-per-task 4)
    LIMIT_SCALE=4  # the limits are the GPU's; a rehearsal on a shared CPU runs slower and has no 8-minute bound
fi
"$PY" - > "$OUT/versions.json" <<'EOF'
import json, platform, torch
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__,
                  "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}))
EOF

STATUS=()
step() {  # step NAME TIMEOUT_S OUTFILE COMMAND...: run, keep stdout in OUTFILE, record exit code and seconds
    local name=$1 limit=$(($2 * LIMIT_SCALE)) out=$3; shift 3
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$out" 2> "$OUT/$name.log"
    local rc=$?
    STATUS+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start))}")
    echo "gpu_check: $name rc=$rc $((SECONDS - start)) s" >&2
}

if [ "$DEVICE" = cuda ]; then
    step gpu_tests 50 gpu_tests.txt "$PY" -m pytest -q -m gpu tests/test_gpu.py -k "not captured" \
        --junitxml "$OUT/gpu_tests.xml"
    step gpu_compile_tests 70 gpu_compile_tests.txt "$PY" -m pytest -q -m gpu tests/test_gpu.py -k captured \
        --junitxml "$OUT/gpu_compile_tests.xml"
fi
step bench_update 30 bench_update.json "$PY" -m mtrl bench update --json --combiners mean,cagrad --tasks "$TASKS" \
    --devices "$DEVICE" --repeats 5
step bench_update_compiled 70 bench_update_compiled.json "$PY" -m mtrl bench update --json --combiners mean,cagrad \
    --tasks "${TASKS%%,*}" --devices "$DEVICE" --repeats 20 --compile "$COMPILE" "${UPDATE_SIZES[@]}"
step bench_train_mt10 60 bench_train_mt10.json "$PY" -m mtrl bench train --json --benchmark MT10 \
    --combiner mean,cagrad --device "$DEVICE" --steps "$STEPS" --warmup 200 --overlap --strategy pool "${SIZES[@]}"
step bench_train_mt10_compiled 70 bench_train_mt10_compiled.json "$PY" -m mtrl bench train --json \
    --benchmark MT10 --combiner cagrad --device "$DEVICE" --steps "$STEPS" --warmup 200 --overlap --strategy pool \
    --set train.compile="${COMPILE##*,}" "${SIZES[@]}"
step bench_train_mt50 60 bench_train_mt50.json "$PY" -m mtrl bench train --json --benchmark MT50 \
    --combiner mean,cagrad --device "$DEVICE" --steps "$MT50_STEPS" --warmup 100 --overlap --strategy pool "${SIZES[@]}"
step bench_env 30 bench_env.json "$PY" -m mtrl bench env --json --benchmarks MT10 --steps "$ENV_STEPS" \
    --repeats "$ENV_REPEATS" --workers 0,5
step train_mt10 40 train_mt10.txt "$PY" -m mtrl train --config configs/mt10_mtsac.yaml device="$DEVICE" \
    run.dir="$OUT/train_mt10" train.total_steps="$TRAIN_STEPS" train.warmup_steps="$TRAIN_WARMUP" train.overlap=true \
    env.vector_strategy=pool eval.every=0 eval.episodes=1 checkpoint.every=0 log.every=500 log.progress=false \
    log.tensorboard=false
cp "$OUT/train_mt10/metrics.jsonl" "$OUT/train_mt10_metrics.jsonl" 2>/dev/null

(IFS=,; echo "[${STATUS[*]}]") > "$OUT/summary.json"
cat "$OUT/summary.json"
for s in "${STATUS[@]}"; do
    case $s in *'"rc": 0,'*) ;; *) exit 1 ;; esac
done
