# syntax=docker/dockerfile:1
# Three images from one build:
#   docker build --target operator   -t mlopt/operator:0.1.0 .     # kopf, no torch (~380 MB)
#   docker build --target worker     -t mlopt/worker:0.1.0 .       # CPU: torch (CPU build), onnxruntime
#   docker build --target worker-gpu -t mlopt/worker-gpu:0.1.0 .   # CUDA: torch + onnxruntime-gpu
# Every image runs as the non-root user 10001 and works with a read-only root filesystem
# (the Job mounts an emptyDir at /scratch and points HOME/TMPDIR/caches there).
#
# Build arguments:
#   PYTHON_IMAGE     any Debian-based image with Python 3.11 and pip (CI: debootstrap bookworm,
#                    tools/build-images.sh, since no registry is reachable there)
#   TORCH_INDEX_URL  where the CPU worker gets torch: the CPU-only index by default (~200 MB);
#                    https://pypi.org/simple gives PyPI's CUDA build (~3 GB, also runs on CPU)
# pip's downloads go to a cache mount (BuildKit or buildah), never into a layer.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: one wheel of the project -------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml ./
# pyproject's `readme` is only the package's long description: a stub keeps a docs edit from
# rebuilding the images (the worker's is ~6 GB to export and import).
RUN echo "# mlopt (see the project's README)" > README.md
COPY optimizer ./optimizer
COPY operator ./operator
RUN --mount=type=cache,target=/root/.cache/pip pip wheel --no-deps --wheel-dir /wheels . \
 && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
[open(f'/wheels/{extra}.txt', 'w').write('\\n'.join(p['dependencies'] + p['optional-dependencies'][extra])) \
 for extra in ('operator', 'optimizer')]"

# ---- runtime base: non-root user, no bytecode writes -------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
RUN groupadd --gid 10001 mlopt && useradd --uid 10001 --gid 10001 --home-dir /scratch --no-create-home mlopt
WORKDIR /scratch

# ---- operator ------------------------------------------------------------------------------------
FROM runtime AS operator
# Pinned dependencies first (a layer that only changes with pyproject.toml), then the project itself;
# COPY, not a bind mount, so a changed wheel always invalidates the layer cache.
COPY --from=build /wheels/operator.txt /tmp/operator.txt
RUN --mount=type=cache,target=/root/.cache/pip pip install -r /tmp/operator.txt
COPY --from=build /wheels/mlopt-*.whl /tmp/
RUN pip install --no-deps /tmp/mlopt-*.whl && rm /tmp/mlopt-*.whl
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["mlopt", "operator"]
CMD ["--liveness=http://0.0.0.0:8080/healthz"]

# ---- CPU worker ----------------------------------------------------------------------------------
FROM runtime AS worker
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Dependencies in their own layer, from the pinned list alone: a code change reuses this (large) layer.
COPY --from=build /wheels/optimizer.txt /tmp/optimizer.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --extra-index-url "${TORCH_INDEX_URL}" -r /tmp/optimizer.txt
COPY --from=build /wheels/mlopt-*.whl /tmp/
RUN pip install --no-deps /tmp/mlopt-*.whl && rm /tmp/mlopt-*.whl
USER 10001:10001
ENTRYPOINT ["mlopt", "worker"]

# ---- GPU worker ----------------------------------------------------------------------------------
FROM runtime AS worker-gpu
# torch 2.13's default Linux wheel bundles CUDA 13 (nvidia-*-cu13 pip packages), and so does
# onnxruntime-gpu 1.31.1 (the newest on PyPI): its [cuda,cudnn] extras resolve to CUDA 13 packages
# (nvidia-cuda-runtime 13.x, nvidia-cudnn-cu13 9.x), shared with torch; mlopt calls
# onnxruntime.preload_dlls() before creating a CUDA session. Version skew, deliberate: the CPU
# images run onnxruntime 1.32.0 (pyproject.toml) but onnxruntime-gpu stops at 1.31.1, so GPU results
# come from ONNX Runtime 1.31 (results.json records the version). Not built in CI (no GPU there).
ARG ORT_GPU_VERSION=1.31.1
COPY --from=build /wheels/optimizer.txt /wheels/mlopt-*.whl /tmp/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -r /tmp/optimizer.txt && pip install --no-deps /tmp/mlopt-*.whl && rm /tmp/mlopt-*.whl \
 && pip uninstall -y onnxruntime \
 && pip install "onnxruntime-gpu[cuda,cudnn]==${ORT_GPU_VERSION}" \
 && python -c "import onnxruntime as ort; assert 'CUDAExecutionProvider' in ort.get_available_providers()"
# The device plugin sets NVIDIA_VISIBLE_DEVICES; these make the driver's compute libraries available.
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
ENTRYPOINT ["mlopt", "worker"]
