#!/usr/bin/env bash
# The GPU check, on a machine with an NVIDIA GPU (driver and nvidia-smi), Python 3.11+, PyPI access and
# root or a redis-server on PATH. In about 8 minutes it:
#   1. installs the `gpu` extra (onnxruntime-gpu) with `train` and `dev` in its own venv (.venv-gpu)
#      and fails unless ONNX Runtime offers the CUDA provider;
#   2. trains the tiny test model (seconds) and runs the runtime and API contract tests with
#      CLICKRANK_TEST_DEVICE=cuda (the apps under test load the model on CUDA);
#   3. runs the model-stage benchmark (loadtests.model_bench --device cuda);
#   4. serves the tiny model with CLICKRANK_DEVICE=cuda and runs a short end-to-end `clickrank bench`
#      (predict, 1/8/32 connections, 10 s each); with device cuda a model that cannot start CUDA is not
#      loaded, so steps 2 and 4 fail rather than fall back to the CPU;
#   5. appends the figures to docs/benchmarks.md under "GPU check" (and keeps the reports in
#      reports/gpu-check-<timestamp>/).
# GPU_CHECK_DEVICE=cpu runs the same steps on the CPU (a dry run of the script itself, without nvidia-smi,
# writing the section into the report folder instead of docs/benchmarks.md);
# GPU_CHECK_VENV=PATH uses an existing venv instead of creating .venv-gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
device="${GPU_CHECK_DEVICE:-cuda}"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
out="$PWD/reports/gpu-check-$stamp"
mkdir -p "$out"
started=$SECONDS
step() { echo "gpu-check [$((SECONDS - started)) s]: $*"; }

if [[ "$device" == cuda ]]; then
    command -v nvidia-smi >/dev/null || { echo "gpu-check: nvidia-smi not found: not a GPU machine" >&2; exit 2; }
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
else
    echo "CPU dry run (GPU_CHECK_DEVICE=$device)" | tee "$out/gpu.txt"
fi

venv="${GPU_CHECK_VENV:-.venv-gpu}"
step "venv $venv"
if [[ -z "${GPU_CHECK_VENV:-}" ]]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q -e ".[gpu,train,dev]"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
python - "$device" <<'EOF'
import sys
import onnxruntime as ort
providers = ort.get_available_providers()
print("onnxruntime", ort.__version__, providers)
if sys.argv[1] == "cuda" and "CUDAExecutionProvider" not in providers:
    sys.exit("gpu-check: onnxruntime offers no CUDAExecutionProvider (is onnxruntime-gpu installed, CUDA 13 there?)")
EOF

if ! command -v redis-server >/dev/null; then
    step "installing redis-server"
    apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
fi

model="$out/model"
step "training the tiny model"
clickrank train --tiny --skip-eval --model-dir "$model" >"$out/train.log" 2>&1

step "runtime and API contract tests on $device"
CLICKRANK_TEST_DEVICE="$device" CLICKRANK_TEST_MODEL_DIR="$model" \
    python -m pytest -q -p no:cacheprovider tests/test_runtime.py tests/test_api.py tests/test_retrieval.py \
    2>&1 | tee "$out/tests.log" | tail -n 3

step "model-stage benchmark"
python -m loadtests.model_bench --model-dir "$model" --device "$device" --threads 1,4 --batch-sizes 1,8,64 \
    --repeats 3 --out "$out/model-bench" 2>&1 | tail -n 3

step "end to end on $device"
redis_port=$(python -c "from models.redis_process import free_port; print(free_port())")
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
    --dir "$out" --logfile "$out/redis.log"
trap 'redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true' EXIT
clickrank bench --spawn --model-dir "$model" --redis-url "redis://127.0.0.1:$redis_port/0" --load-history \
    --env "CLICKRANK_DEVICE=$device" --env CLICKRANK_MAX_BATCH_DELAY_MS=2 --scenario predict \
    --concurrency 1,8,32 --duration 10 --out "$out/e2e" 2>&1 | tail -n 5

target=docs/benchmarks.md
[[ "$device" == cuda ]] || target="$out/benchmarks-section.md"  # a dry run leaves the docs alone
step "writing $target"
{
    echo
    echo "## GPU check (\`scripts/gpu-check.sh\`, $stamp)"
    echo
    echo "Device: $(cat "$out/gpu.txt"); $(python -c 'import onnxruntime as o; print("onnxruntime", o.__version__)')."
    echo "Tests on $device: $(tail -n 1 "$out/tests.log")."
    echo
    echo "### Model stage (\`python -m loadtests.model_bench --device $device\`)"
    echo
    cat "$out/model-bench/model_bench.md"
    echo
    echo "### End to end (\`clickrank bench --spawn\`, predict, CLICKRANK_DEVICE=$device)"
    echo
    cat "$out/e2e/summary.md"
} >>"$target"
step "done in $((SECONDS - started)) s; reports in $out"
