#!/usr/bin/env bash
# The GPU check, on a machine with an NVIDIA GPU (driver and nvidia-smi) and Python 3.11+. In a few
# minutes it:
#   1. makes ONNX Runtime's CUDA provider available and fails unless it is offered:
#      - online (default): installs the `gpu` extra (onnxruntime-gpu) with `train` and `dev` in its own
#        venv (.venv-gpu; GPU_CHECK_VENV=PATH uses an existing one) and trains the tiny test model;
#      - offline (GPU_CHECK_BUNDLE=DIR, a folder made by scripts/gpu-bundle.sh): installs the bundle's
#        wheels into DIR/site for the host's python3, puts the bundle's redis-server on PATH, finds CUDA
#        and cuDNN in the host's nvidia-* wheels (those PyTorch brings) and uses the bundle's model and
#        MovieLens copy; nothing is downloaded;
#   2. runs the runtime, retrieval and API contract tests with CLICKRANK_TEST_DEVICE=cuda (the apps
#      under test load the model on CUDA);
#   3. runs the model-stage benchmarks: the ranker (loadtests.model_bench --device cuda) and the item
#      encoder on the CPU and on CUDA side by side (loadtests.encoder_bench, with the vectors' |Δ|);
#   4. serves the model with CLICKRANK_DEVICE=cuda, and beside it with CLICKRANK_DEVICE=cpu, each with one
#      uvicorn worker and with GPU_CHECK_WORKERS (default 4; all on the one GPU), and runs a short
#      end-to-end `clickrank bench` (predict, 1/8/32/64 connections, 8 s each, the servers interleaved);
#      with device cuda a model that cannot start CUDA is not loaded, so steps 2 to 4 fail rather than
#      fall back to the CPU;
#   5. writes the figures as a markdown section (benchmarks-section.md in the report folder) and, on a
#      GPU in a checkout (not with GPU_CHECK_BUNDLE), appends it to docs/benchmarks.md.
# Every step runs even when an earlier one failed; the script exits 1 if any did.
# GPU_CHECK_DEVICE=cpu runs the same steps on the CPU (a dry run of the script, without nvidia-smi);
# GPU_CHECK_OUT=DIR writes the reports there instead of reports/gpu-check-<timestamp>.
set -uo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
device="${GPU_CHECK_DEVICE:-cuda}"
bundle="${GPU_CHECK_BUNDLE:-}"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
out="${GPU_CHECK_OUT:-$PWD/reports/gpu-check-$stamp}"
mkdir -p "$out"
started=$SECONDS
failed=()
step() { echo "gpu-check [$((SECONDS - started)) s]: $*"; }
fail() { echo "gpu-check: FAILED: $*" >&2; failed+=("$1"); }

if [[ "$device" == cuda ]]; then
    command -v nvidia-smi >/dev/null || { echo "gpu-check: nvidia-smi not found: not a GPU machine" >&2; exit 2; }
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
else
    echo "CPU dry run (GPU_CHECK_DEVICE=$device)" | tee "$out/gpu.txt"
fi

if [[ -n "$bundle" ]]; then
    bundle="$(cd "$bundle" && pwd)"
    step "installing the bundle's wheels into $bundle/site"
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$bundle/site" \
        "$bundle"/wheels/*.whl || exit 1
    export PYTHONPATH="$bundle/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$bundle/redis/bin:$PATH" CLICKRANK_DATA_DIR="$bundle/ml-100k"
    # onnxruntime-gpu loads libcudart, cuBLAS, cuFFT, cuRAND and cuDNN by name: those of the nvidia-*
    # wheels beside PyTorch, as on any host where pip brought the CUDA libraries.
    cuda_libs="$(python3 -c 'import nvidia, pathlib; print(":".join(sorted({str(p.parent) for root in nvidia.__path__ for p in pathlib.Path(root).rglob("lib*.so*")})))' 2>/dev/null)"
    export LD_LIBRARY_PATH="${cuda_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    model="$bundle/model"
else
    venv="${GPU_CHECK_VENV:-.venv-gpu}"
    step "venv $venv"
    if [[ -z "${GPU_CHECK_VENV:-}" ]]; then
        python3 -m venv "$venv" && "$venv/bin/pip" install -q --constraint constraints.txt -e ".[gpu,train,dev]" || exit 1
    fi
    # shellcheck disable=SC1091
    . "$venv/bin/activate"
    if ! command -v redis-server >/dev/null; then
        step "installing redis-server"
        apt-get update -qq && apt-get install -y -qq redis-server >/dev/null || exit 1
    fi
    model="$out/model"
    step "training the tiny model"
    python3 -m clickrank.cli train --tiny --skip-eval --model-dir "$model" >"$out/train.log" 2>&1 || exit 1
fi
python3 - "$device" <<'EOF' | tee "$out/onnxruntime.txt" || exit 1
import sys
import onnxruntime as ort
providers = ort.get_available_providers()
print("onnxruntime", ort.__version__, ort.get_device(), providers)
if sys.argv[1] == "cuda" and "CUDAExecutionProvider" not in providers:
    sys.exit("gpu-check: onnxruntime offers no CUDAExecutionProvider (is onnxruntime-gpu installed, CUDA 13 there?)")
EOF

step "runtime, retrieval and API contract tests on $device"
CLICKRANK_TEST_DEVICE="$device" CLICKRANK_TEST_MODEL_DIR="$model" \
    python3 -m pytest -q -p no:cacheprovider tests/test_runtime.py tests/test_api.py tests/test_direct_route.py \
    tests/test_retrieval.py \
    >"$out/tests.log" 2>&1 || fail tests
tail -n 3 "$out/tests.log"

step "model-stage benchmarks"
python3 -m loadtests.model_bench --model-dir "$model" --device "$device" --threads 1,4 \
    --batch-sizes 1,8,64,256 --repeats 3 --out "$out/model-bench" >"$out/model-bench.log" 2>&1 || fail model-bench
tail -n 3 "$out/model-bench.log"
encoder_devices=cpu
[[ "$device" == cpu ]] || encoder_devices="cpu,$device"
python3 -m loadtests.encoder_bench --model-dir "$model" --devices "$encoder_devices" --repeats 3 \
    --out "$out/encoder-bench" 2>&1 | tee "$out/encoder-bench.log" || fail encoder-bench

workers="${GPU_CHECK_WORKERS:-4}"
devices=("$device")
[[ "$device" == cpu ]] || devices+=(cpu)
counts=(1)
[[ "$workers" -le 1 ]] || counts+=("$workers")
variants=()
step "end to end on ${devices[*]}, ${counts[*]} worker(s)"
for n in "${counts[@]}"; do
    for d in "${devices[@]}"; do
        variants+=(--variant "$d-w$n:DEVICE=$d,MAX_BATCH_DELAY_MS=2,WORKERS=$n")
    done
done
redis_port=$(python3 -c "from models.redis_process import free_port; print(free_port())")
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
    --dir "$out" --logfile "$out/redis.log" || fail redis
trap 'redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true' EXIT
python3 -m clickrank.cli bench --spawn --model-dir "$model" --redis-url "redis://127.0.0.1:$redis_port/0" \
    --load-history "${variants[@]}" --scenario predict --concurrency 1,8,32,64 --duration 8 --out "$out/e2e" \
    >"$out/e2e.log" 2>&1 || fail e2e
tail -n 5 "$out/e2e.log"

section="$out/benchmarks-section.md"
{
    echo
    echo "## GPU check (\`scripts/gpu-check.sh\`, $stamp)"
    echo
    echo "Device: $(cat "$out/gpu.txt"); $(head -n 1 "$out/onnxruntime.txt")."
    echo "Tests on $device: $(tail -n 1 "$out/tests.log")."
    [[ ${#failed[@]} -eq 0 ]] || echo "Failed steps: ${failed[*]}."
    echo
    echo "### Ranker (\`python -m loadtests.model_bench --device $device\`)"
    echo
    cat "$out/model-bench/model_bench.md" 2>/dev/null
    echo
    echo "### Item encoder (\`python -m loadtests.encoder_bench --devices $encoder_devices\`)"
    echo
    cat "$out/encoder-bench/encoder_bench.md" 2>/dev/null
    echo
    echo "### End to end (\`clickrank bench --spawn\`, predict)"
    echo
    cat "$out/e2e/summary.md" 2>/dev/null
} >"$section"
if [[ "$device" == cuda && -z "$bundle" ]]; then
    cat "$section" >>docs/benchmarks.md
    step "appended the figures to docs/benchmarks.md"
fi
step "done in $((SECONDS - started)) s; reports in $out${failed[*]:+; FAILED: ${failed[*]}}"
[[ ${#failed[@]} -eq 0 ]]
