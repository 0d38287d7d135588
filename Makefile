# hunyuan-lora: one command per stage. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help setup lock test stand-in

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

# The one environment: every install anywhere is `pip install --require-hashes -r requirements.lock`.
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)  ## create .venv from requirements.lock (instant when up to date)

lock:  ## recompile requirements.lock from requirements.in (uv, hashes, Python 3.11 / linux x86_64)
	uvx --from uv==0.13.9 uv pip compile --generate-hashes --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 requirements.in -o requirements.lock

# --- container ---
# The image (Dockerfile): NVIDIA container toolkit + driver >= 570 on the host. The volumes hold
# what must outlive a container: weights (/models), data (/data), runs and SwanLab logs (/outputs).
# SWANLAB_API_KEY is passed through by name from your environment, never written anywhere.
IMAGE_OWNER ?= $(or $(shell git remote get-url origin 2>/dev/null | sed -nE 's#.*github\.com[:/]([^/]+)/.*#\1#p' | tr A-Z a-z),hunyuan-lora)
IMAGE ?= ghcr.io/$(IMAGE_OWNER)/hunyuan-lora
TAG ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
MODELS_VOLUME ?= $(CURDIR)/models
DATA_VOLUME ?= $(CURDIR)/data
OUTPUTS_VOLUME ?= $(CURDIR)/outputs
DOCKER_GPUS ?= all
DOCKER_USER ?= $(shell id -u):$(shell id -g)
DOCKER_BUILD_ARGS ?=
# What docker-train runs in the image, e.g. STAGES="download patch dataset train infer".
STAGES ?= train
# CONFIG / SET / PROMPT given on this command line are handed to the container's make. Host paths
# are not: inside, the configs' models/ data/ outputs/ are the volumes (MODELS_VOLUME -> /models ...).
DOCKER_MAKE_VARS = $(foreach v,CONFIG SET PROMPT,$(if $(filter command line,$(origin $(v))),'$(v)=$($(v))'))
DOCKER_RUN = docker run --rm --ipc=host $(if $(DOCKER_GPUS),--gpus $(DOCKER_GPUS)) --user $(DOCKER_USER) \
	-v $(MODELS_VOLUME):/models -v $(DATA_VOLUME):/data -v $(OUTPUTS_VOLUME):/outputs -e SWANLAB_API_KEY

.PHONY: docker-build docker-train docker-shell lint-container buildah-build

docker-build:  ## build the image IMAGE:TAG (labels: source, version, requirements.lock sha256, pins)
	docker build $(addprefix --build-arg=,$(shell IMAGE_VERSION=$(TAG) scripts/image_build_args.sh)) \
	  $(DOCKER_BUILD_ARGS) -t $(IMAGE):$(TAG) .

docker-train:  ## run `make STAGES` (default: train) in the image on all GPUs, with the volumes
	mkdir -p $(MODELS_VOLUME) $(DATA_VOLUME) $(OUTPUTS_VOLUME)
	$(DOCKER_RUN) $(IMAGE):$(TAG) $(STAGES) $(DOCKER_MAKE_VARS)

docker-shell:  ## interactive shell in the image (same GPUs, volumes, user as docker-train)
	mkdir -p $(MODELS_VOLUME) $(DATA_VOLUME) $(OUTPUTS_VOLUME)
	$(DOCKER_RUN) -it --entrypoint bash $(IMAGE):$(TAG)

lint-container: setup  ## hadolint the Dockerfile, actionlint the workflows
	$(VENV)/bin/hadolint Dockerfile
	scripts/actionlint.sh

buildah-build:  ## build the Dockerfile without a daemon (buildah on a debootstrap bookworm base; slow)
	bash scripts/buildah_build.sh
# --- end container ---
