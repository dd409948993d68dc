# syntax=docker/dockerfile:1
# Three images from one build:
#   docker build --target operator   -t mlopt/operator:0.1.0 .     # kopf, no torch (~150 MB)
#   docker build --target worker     -t mlopt/worker:0.1.0 .       # CPU: torch (CPU build), onnxruntime
#   docker build --target worker-gpu -t mlopt/worker-gpu:0.1.0 .   # CUDA: torch + onnxruntime-gpu
# Every image runs as the non-root user 10001 and works with a read-only root filesystem
# (the Job mounts an emptyDir at /scratch and points HOME/TMPDIR/caches there).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: one wheel of the project -------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY optimizer ./optimizer
COPY operator ./operator
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- runtime base: non-root user, no bytecode writes -------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --gid 10001 mlopt && useradd --uid 10001 --gid 10001 --home-dir /scratch --no-create-home mlopt
WORKDIR /scratch

# ---- operator ------------------------------------------------------------------------------------
FROM runtime AS operator
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install "$(ls /wheels/mlopt-*.whl)[operator]"
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["mlopt", "operator"]
CMD ["--liveness=http://0.0.0.0:8080/healthz"]

# ---- CPU worker ----------------------------------------------------------------------------------
FROM runtime AS worker
# torch's CPU-only build: the default wheel would bring ~3 GB of CUDA libraries.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --extra-index-url https://download.pytorch.org/whl/cpu "$(ls /wheels/mlopt-*.whl)[optimizer]"
USER 10001:10001
ENTRYPOINT ["mlopt", "worker"]

# ---- GPU worker ----------------------------------------------------------------------------------
FROM runtime AS worker-gpu
# torch 2.13's default Linux wheel bundles CUDA 13 (nvidia-*-cu13 pip packages), while the
# onnxruntime-gpu wheel on PyPI is built for CUDA 12 + cuDNN 9: its [cuda,cudnn] extras install
# those libraries as pip packages (different sonames, so both coexist), and mlopt calls
# onnxruntime.preload_dlls() before creating a CUDA session. Not built here (no Docker engine).
ARG ORT_GPU_VERSION=1.31.1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install "$(ls /wheels/mlopt-*.whl)[optimizer]" \
 && pip uninstall -y onnxruntime \
 && pip install "onnxruntime-gpu[cuda,cudnn]==${ORT_GPU_VERSION}" \
 && python -c "import onnxruntime as ort; assert 'CUDAExecutionProvider' in ort.get_available_providers()"
# The device plugin sets NVIDIA_VISIBLE_DEVICES; these make the driver's compute libraries available.
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
ENTRYPOINT ["mlopt", "worker"]
