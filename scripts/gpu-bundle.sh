#!/usr/bin/env bash
# An offline bundle for scripts/gpu-check.sh (GPU_CHECK_BUNDLE=OUT_DIR) on a GPU host that has Python,
# PyTorch with its CUDA wheels and nvidia-smi but no network:
#   OUT_DIR/wheels   onnxruntime-gpu (GPU_BUNDLE_ORT, default the newest) and every package the service and
#                    its tests need at run time, at the versions installed in the active environment,
#                    for the host's Python (GPU_BUNDLE_PYTHON, default 3.12), except those named in
#                    GPU_BUNDLE_SKIP (default: numpy, tokenizers and huggingface-hub, which a host with
#                    PyTorch and transformers has: large wheels not worth carrying);
#   OUT_DIR/model    a copy of MODEL_DIR (an export, e.g. `clickrank train --tiny --skip-eval`);
#   OUT_DIR/ml-100k  MovieLens 100K (CLICKRANK_DATA_DIR, default ../shared/data/ml-100k);
#   OUT_DIR/redis    this machine's redis-server and redis-cli with the shared libraries they load beyond
#                    glibc, behind wrappers in OUT_DIR/redis/bin (an x86-64 glibc host).
# Usage (in the dev venv, from the repository root): scripts/gpu-bundle.sh OUT_DIR MODEL_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -eq 2 ]] || { echo "usage: $0 OUT_DIR MODEL_DIR" >&2; exit 2; }
out="$1"
model="$2"
[[ -f "$model/manifest.json" ]] || { echo "gpu-bundle: $model/manifest.json not found" >&2; exit 2; }
data="${CLICKRANK_DATA_DIR:-../shared/data/ml-100k}"
[[ -f "$data/u.data" ]] || { echo "gpu-bundle: MovieLens not found at $data" >&2; exit 2; }
python_version="${GPU_BUNDLE_PYTHON:-3.12}"
mkdir -p "$out/wheels" "$out/redis/bin" "$out/redis/lib"

# The run-time closure of clickrank's requirements and the tests' client (httpx), pinned as installed.
pins=$(GPU_BUNDLE_SKIP="${GPU_BUNDLE_SKIP:-numpy tokenizers huggingface-hub}" python - <<'EOF'
import os
import re
from importlib.metadata import distribution
from packaging.requirements import Requirement

skip = {re.sub(r"[-_.]+", "-", n).lower() for n in os.environ["GPU_BUNDLE_SKIP"].split()}
wanted = [Requirement(r) for r in distribution("clickrank").requires if "extra ==" not in r]
wanted.append(Requirement("httpx"))
seen: dict[str, str] = {}
while wanted:
    req = wanted.pop()
    name = re.sub(r"[-_.]+", "-", req.name).lower()
    if name in seen or name in skip or (req.marker and not req.marker.evaluate()):
        continue
    dist = distribution(name)
    seen[name] = dist.version
    wanted += [Requirement(r) for r in dist.requires or [] if "extra ==" not in r]
print(" ".join(f"{n}=={v}" for n, v in sorted(seen.items())))
EOF
)
ort="onnxruntime-gpu${GPU_BUNDLE_ORT:+==$GPU_BUNDLE_ORT}"
echo "gpu-bundle: wheels for Python $python_version: $ort $pins"
# shellcheck disable=SC2086  # the pins are one word each
python -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
    -d "$out/wheels" "$ort" $pins

rm -rf "$out/model" "$out/ml-100k"
cp -r "$model" "$out/model"
cp -r "$data" "$out/ml-100k"

for tool in redis-server redis-cli; do
    binary="$(command -v "$tool")" || { echo "gpu-bundle: $tool not on PATH" >&2; exit 2; }
    cp "$binary" "$out/redis/lib/$tool"
    ldd "$binary" | awk '$3 ~ /^\// {print $3}' | grep -v -E '/(libc|libm|libpthread|libdl|librt|ld-linux[^/]*)\.so' \
        | xargs -r cp -n -t "$out/redis/lib/"
    printf '#!/bin/sh\nhere="$(dirname "$(readlink -f "$0")")/../lib"\nLD_LIBRARY_PATH="$here" exec "$here/%s" "$@"\n' \
        "$tool" >"$out/redis/bin/$tool"
    chmod +x "$out/redis/bin/$tool"
done
du -sh "$out"/*
