# hunyuan-lora: the pinned training image. `make docker-build` builds it, `make docker-train` runs
# `make train` in it; `docker run IMAGE <target>` runs any stage (ENTRYPOINT is make).
#
# BASE_IMAGE: nvidia/cuda:13.0.2-base-ubuntu22.04, and why exactly that one:
# * CUDA 13.0 matches torch==2.11.0 from PyPI (the cu130 build, cuda-toolkit 13.0.2 in the lock).
#   That wheel brings its own CUDA user-space libraries (cuBLAS, cuDNN, NCCL, ... as hash-pinned
#   nvidia-* wheels in requirements.lock), so the image needs no toolkit or cuDNN from the base: the
#   `-base-` flavour is enough. `-cudnn-runtime-` would add ~3 GB of a second cuBLAS/cuDNN that
#   nothing loads.
# * It is still a CUDA image rather than plain Ubuntu because it sets what the NVIDIA container
#   toolkit reads: NVIDIA_VISIBLE_DEVICES/NVIDIA_DRIVER_CAPABILITIES (GPUs are mounted in) and
#   NVIDIA_REQUIRE_CUDA=cuda>=13.0: the image's driver check. On a host driver older than 580 the
#   container fails to start with "unsatisfied condition: cuda>=13.0, please update your driver"
#   instead of torch quietly finding no GPU; `make check` inside says the same in its driver row.
#   It ships cuda-compat-13-0 (forward-compatible libcuda that datacenter GPUs can use on an older
#   driver). The driver itself (libcuda.so) always comes from the host at run time.
# * Ubuntu 22.04, not 24.04: requirements.lock is compiled for CPython 3.11 (cp311 wheels).
#   22.04 has python3.11 + python3.11-venv in its archive (universe); 24.04 has only 3.12 and
#   would need the deadsnakes PPA (a second, unpinned package source plus a key fetch).
# * Debian bookworm's python3 is 3.11 too, so the same `apt-get install python3.11 python3.11-venv`
#   works on a Debian base: `make buildah-build` builds this file unchanged on a local debootstrap
#   bookworm base (no registry needed) to prove every RUN step executes.
ARG BASE_IMAGE=nvidia/cuda:13.0.2-base-ubuntu22.04
FROM ${BASE_IMAGE}

# Labels. The values come from scripts/image_build_args.sh (make docker-build, buildah-build and
# the image workflow all use it): LOCK_SHA256 ties the image to the exact requirements.lock it was
# installed from; PINNED_VERSIONS is read from that lock, not a second list.
ARG VERSION=dev
ARG REVISION=unknown
ARG SOURCE=unknown
ARG LOCK_SHA256=unknown
ARG PINNED_VERSIONS=unknown
LABEL org.opencontainers.image.title="hunyuan-lora" \
      org.opencontainers.image.description="Reproducible LoRA fine-tuning of Tencent Hunyuan-A13B-Instruct: make download patch dataset train infer" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      io.hunyuan-lora.requirements-lock.sha256="${LOCK_SHA256}" \
      io.hunyuan-lora.pinned-versions="${PINNED_VERSIONS}"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# System packages. Not version-pinned on purpose: the base image tag fixes the distribution
# release, and the two bases this file must build on (Ubuntu 22.04, Debian 12) carry different
# version strings for the same packages; everything Python is pinned by hash in requirements.lock.
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      ca-certificates git make python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/*

# The non-root user that runs everything (uid 1000, the usual first user on a cloud box, so files
# on bind-mounted volumes belong to that user; `make docker-train` passes --user of the caller).
# Its home and the volume mount points are writable for any uid (sticky, like /tmp) so the image
# also works under `docker run --user <uid>:<gid>`.
RUN useradd --create-home --uid 1000 --shell /bin/bash hunyuan \
 && chmod 1777 /home/hunyuan \
 && install -d -m 1777 -o hunyuan -g hunyuan /models /data /outputs

# The environment lives outside the source tree, root-owned (read-only for the user, so nothing
# can drift from the lock at run time). VENV is the Makefile's variable: `make` inside the image
# uses /opt/venv and its stamp instead of creating .venv.
ENV VENV=/opt/venv \
    PYTHON=python3.11 \
    PATH=/opt/venv/bin:${PATH} \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

WORKDIR /workspace/hunyuan-lora

# 1) The locked dependencies: exactly the Makefile's setup command (tests/test_container.py checks
#    the strings match), in its own layer so a source change does not re-download ~3 GB.
#    Build-time only, never kept in the image: PIP_INDEX_URL (a PyPI mirror, e.g. in mainland China)
#    and PIP_CERT (the CA bundle of a TLS-intercepting proxy, bind-mounted by the builder). Whichever
#    index serves the files, --require-hashes still accepts only the lock's exact wheels.
ARG PIP_INDEX_URL
ARG PIP_CERT
COPY requirements.lock pyproject.toml ./
RUN python3.11 -m venv "${VENV}" \
 && "${VENV}/bin/python" -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements.lock

# 2) The project: `make setup` itself (the lock step is a no-op now, then the editable install of
#    the project and the stamp), so later `make <stage>` calls see an up-to-date environment.
#    models/, data/, outputs/ (the configs' relative default paths) point at the volumes. The tree
#    belongs to the user; the folder itself is also sticky-writable for any uid (`make demo`
#    writes artifacts/ here).
COPY --chown=hunyuan:hunyuan . .
RUN make setup \
 && ln -sfn /models models && ln -sfn /data data && ln -sfn /outputs outputs \
 && chown -h hunyuan:hunyuan models data outputs \
 && chown -R hunyuan:hunyuan src \
 && chown hunyuan:hunyuan . && chmod 1777 .

# Caches on the volumes. The model snapshot itself goes to models/ (= /models) as the configs say,
# each run (adapter, SwanLab's local logs in <output_dir>/swanlog) to outputs/ (= /outputs).
# SWANLAB_LOG_DIR stays unset: the stages pass the run's folder themselves, and `swanlab watch`
# refuses to start when that variable names a folder that does not exist. SWANLAB_API_KEY is NOT
# set here: it is read from the environment at run time only (docker run -e SWANLAB_API_KEY).
ENV HOME=/home/hunyuan \
    HF_HOME=/models/.cache/huggingface \
    MODELSCOPE_CACHE=/models/.cache/modelscope

VOLUME ["/models", "/data", "/outputs"]
# `make watch` (SwanLab dashboard).
EXPOSE 5092

# Numeric, so runtimes that enforce runAsNonRoot can verify it without /etc/passwd (= hunyuan).
USER 1000:1000
ENTRYPOINT ["make"]
CMD ["help"]
