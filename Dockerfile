# syntax=docker/dockerfile:1
#
# clickrank serving images (BuildKit, the default builder since Docker Engine 23):
#
#   docker build --target cpu -t clickrank:cpu .    python:3.11-slim + onnxruntime
#   docker build --target gpu -t clickrank:gpu .    CUDA 13 + cuDNN 9 runtime + onnxruntime-gpu (also the
#                                                   default target of a plain `docker build .`)
#
# The model store is /models (CLICKRANK_MODEL_DIR). Mount an export made by `clickrank train` there
# read-only, or bake one into the image with the *-bundled targets:
#
#   docker build --target cpu-bundled --build-context model=./artifacts -t clickrank:cpu-model .
#
# Neither image contains torch or transformers (the `train` extra): each venv stage fails the build if
# they, or the other ONNX Runtime flavour, got in. docs/deployment.md has the details.

ARG PYTHON_VERSION=3.11.18
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu22.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9
# onnxruntime-gpu must match the CUDA major of CUDA_IMAGE: 1.27.0 and later are built for CUDA 13,
# 1.19.0 to 1.26.0 for CUDA 12 (with CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04).
# The gpu-venv stage fails the build when a library the CUDA provider links is missing from the image.
ARG ORT_GPU_VERSION=1.31.1

# ------------------------------------------------------------------------------ builder: the wheel
FROM python:${PYTHON_VERSION}-slim AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY clickrank/ clickrank/
COPY models/ models/
COPY service/ service/
COPY loadtests/ loadtests/
# constraints.txt (scripts/lock.sh) pins every dependency to the version CI tested: rebuilding the same
# commit later gives the same packages.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . && cp constraints.txt /wheels/

# ------------------------------------------------------------------------------ model (bundled targets)
# Stands in for `--build-context model=DIR`, which replaces this stage by the directory DIR.
FROM python:${PYTHON_VERSION}-slim AS model
RUN echo "no model to bundle: build the *-bundled targets with --build-context model=./artifacts" >&2 \
    && exit 1

# ------------------------------------------------------------------------------ CPU
FROM python:${PYTHON_VERSION}-slim AS cpu-venv
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=builder /wheels /wheels
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --constraint=/wheels/constraints.txt \
       "$(echo /wheels/clickrank-*.whl)[cpu]" \
    && /opt/venv/bin/pip check
RUN /opt/venv/bin/python -c "import importlib.metadata as md, service.app, service.load_history; \
    have = {d.metadata['Name'].lower() for d in md.distributions()}; \
    bad = sorted(have & {'torch', 'transformers', 'onnxruntime-gpu'}); \
    assert not bad, f'the CPU serving image must not contain {bad}'; \
    assert 'onnxruntime' in have, 'onnxruntime is missing'"

FROM python:${PYTHON_VERSION}-slim AS cpu
LABEL org.opencontainers.image.title="clickrank (CPU)" \
      org.opencontainers.image.description="Click-probability and next-item service on ONNX Runtime (CPU)" \
      org.opencontainers.image.licenses="MIT"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    CLICKRANK_MODEL_DIR=/models \
    CLICKRANK_DEVICE=cpu \
    CLICKRANK_WORKERS=2
RUN groupadd --system --gid 10001 clickrank \
    && useradd --system --uid 10001 --gid clickrank --no-log-init --no-create-home \
       --home-dir /app --shell /usr/sbin/nologin clickrank \
    && mkdir /app /models
COPY --from=cpu-venv /opt/venv /opt/venv
WORKDIR /app
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["/opt/venv/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["clickrank", "serve", "--host", "0.0.0.0", "--port", "8000"]

FROM cpu AS cpu-bundled
COPY --from=model / /models/
# Loads the graphs and verifies the manifest checksums, as the user the service runs as.
RUN python -c "from models.model_dir import ModelDir; from service.runtime import OnnxModels; \
    print('bundled model', OnnxModels(ModelDir('/models').load(), device='cpu').version)"

# ------------------------------------------------------------------------------ GPU
FROM ${UV_IMAGE} AS uv

# The CUDA images have no Python 3.11: uv installs a standalone CPython (same version as the CPU image)
# into /opt/python, copied into the runtime stage beside the venv; no apt, no compilers.
FROM ${CUDA_IMAGE} AS gpu-venv
ARG PYTHON_VERSION
ARG ORT_GPU_VERSION
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_MANAGED_PYTHON=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY --from=uv /uv /usr/local/bin/uv
COPY --from=builder /wheels /wheels
RUN uv python install --no-bin "${PYTHON_VERSION}" \
    && "$(uv python find "${PYTHON_VERSION}")" -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --constraint=/wheels/constraints.txt \
       "$(echo /wheels/clickrank-*.whl)[gpu]" "onnxruntime-gpu==${ORT_GPU_VERSION}" \
    && /opt/venv/bin/pip check
RUN /opt/venv/bin/python -c "import importlib.metadata as md, service.app, service.load_history; \
    have = {d.metadata['Name'].lower() for d in md.distributions()}; \
    bad = sorted(have & {'torch', 'transformers', 'onnxruntime'}); \
    assert not bad, f'the GPU serving image must not contain {bad}'; \
    assert 'onnxruntime-gpu' in have, 'onnxruntime-gpu is missing'"
# libcuda.so.1 comes from the host driver at run time (NVIDIA Container Toolkit); everything else the
# CUDA provider links, and cuDNN 9 (loaded on demand), must be in the image.
RUN provider="$(echo /opt/venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime_providers_cuda.so)" \
    && missing="$(ldd "$provider" | grep 'not found' | grep -v 'libcuda\.so\.1' || true)" \
    && if [ -n "$missing" ]; then \
         echo "onnxruntime-gpu ${ORT_GPU_VERSION} needs libraries that the CUDA image lacks:" >&2; \
         echo "$missing" >&2; exit 1; \
       fi \
    && if ! ldconfig -p | grep -q 'libcudnn\.so\.9'; then echo "cuDNN 9 is missing from the CUDA image" >&2; exit 1; fi

FROM ${CUDA_IMAGE} AS gpu-runtime
LABEL org.opencontainers.image.title="clickrank (GPU)" \
      org.opencontainers.image.description="Click-probability and next-item service on ONNX Runtime (CUDA)" \
      org.opencontainers.image.licenses="MIT"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    CLICKRANK_MODEL_DIR=/models \
    CLICKRANK_DEVICE=auto
RUN groupadd --system --gid 10001 clickrank \
    && useradd --system --uid 10001 --gid clickrank --no-log-init --no-create-home \
       --home-dir /app --shell /usr/sbin/nologin clickrank \
    && mkdir /app /models
COPY --from=gpu-venv /opt/python /opt/python
COPY --from=gpu-venv /opt/venv /opt/venv
WORKDIR /app
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["/opt/venv/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["clickrank", "serve", "--host", "0.0.0.0", "--port", "8000"]

FROM gpu-runtime AS gpu-bundled
COPY --from=model / /models/
RUN python -c "from models.model_dir import ModelDir; from service.runtime import OnnxModels; \
    print('bundled model', OnnxModels(ModelDir('/models').load(), device='cpu').version)"

# The last stage, so a plain `docker build .` gives the GPU image.
FROM gpu-runtime AS gpu
