# hunyuan-lora: one command per stage. `make help` lists the targets.
#   make demo                                   whole pipeline on the stand-in model (CPU, offline)
#   make download patch dataset train infer CONFIG=configs/huanhuan.yaml MODEL_DIR=/root/autodl-tmp/...
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# What a user types reaches Python exactly as typed, through the environment (HL_<NAME>), never
# through a shell command line: spaces, quotes, `$`, backticks, newlines and non-ASCII survive, and
# nothing a user types is run. $(value ...) stops make from expanding `$` inside the text; HL_<NAME>
# in the environment (docker-train hands values to the container's make that way) counts as typed.
USER_VARS := CONFIG MODEL_DIR DATA OUTPUT_DIR SET PROMPT STAND_IN_DIR EVAL
TYPED_VARS := $(foreach v,$(USER_VARS),$(if $(filter command line,$(origin $(v))),$(v)))
$(foreach v,$(USER_VARS),$(if $(filter undefined,$(origin $(v))),$(if $(filter environment,$(origin HL_$(v))),\
  $(eval $(v) := $$(value HL_$(v))))))
$(foreach v,$(USER_VARS),$(if $(filter command line environment,$(origin $(v))),$(eval override $(v) := $$(value $(v)))))
CONFIG ?= configs/huanhuan.yaml
STAND_IN_DIR ?= artifacts/stand-in
# Every stage reads HL_CONFIG / HL_MODEL_DIR / HL_DATA / HL_OUTPUT_DIR / HL_SET (cli.add_cli_args).
$(foreach v,$(USER_VARS),$(eval export HL_$(v) = $$($(v))))

# Multi-GPU: LAUNCH=<configs/accelerate/ name> runs train under `accelerate launch` with NPROC processes
# (all GPUs of all machines); ACCELERATE_ARGS adds e.g. --num_machines 2 --machine_rank 0
# --main_process_ip 10.0.0.1 --main_process_port 29500 (the same command on every machine).
$(foreach v,LAUNCH NPROC ACCELERATE_ARGS,$(if $(filter command line environment,$(origin $(v))),\
  $(eval override $(v) := $$(value $(v)))))
LAUNCH ?=
NPROC ?= $(shell nvidia-smi -L 2>/dev/null | wc -l)
ACCELERATE_ARGS ?=
# ACCELERATE_ARGS reaches accelerate as words of the environment variable (split, never run).
export HL_ACCELERATE_ARGS = $(ACCELERATE_ARGS)
LAUNCH_CONFIG = configs/accelerate/$(LAUNCH).yaml
LAUNCHES := $(basename $(notdir $(wildcard configs/accelerate/*.yaml)))
NOT_DIGITS = $(subst 0,,$(subst 1,,$(subst 2,,$(subst 3,,$(subst 4,,$(subst 5,,$(subst 6,,$(subst 7,,$(subst 8,,$(subst 9,,$(1)))))))))))
# LAUNCH and NPROC go onto accelerate's command line: only a configs/accelerate/ name and a number.
CHECK_LAUNCH = $(if $(LAUNCH),$(if $(filter-out 1,$(words $(LAUNCH)))$(filter-out $(LAUNCHES),$(LAUNCH)),\
  $(error LAUNCH must be one of: $(LAUNCHES) (configs/accelerate/<name>.yaml))))$(if $(LAUNCH),$(if \
  $(filter-out 1,$(words $(NPROC)))$(call NOT_DIGITS,$(NPROC)),$(error NPROC must be a number of processes, e.g. NPROC=2)))
TRAIN_LAUNCHER = $(CHECK_LAUNCH)$(if $(LAUNCH),$(VENV)/bin/accelerate launch --config_file $(LAUNCH_CONFIG) \
                 --num_processes $(NPROC) $$HL_ACCELERATE_ARGS,$(PY))
CHECK_ENV = $(CHECK_LAUNCH)$(if $(LAUNCH),HL_ACCELERATE_CONFIG=$(LAUNCH_CONFIG) HL_NPROC=$(NPROC))

.PHONY: help setup lock test stand-in download patch dataset train infer merge demo bench

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

# The one environment: every install anywhere is `pip install --require-hashes -r requirements.lock`.
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)  ## create .venv from requirements.lock (instant when up to date)

lock: setup  ## recompile requirements.lock from requirements.in (uv, hashes, Python 3.11 / linux x86_64)
	$(PY) -m pip install --quiet --disable-pip-version-check uv==0.13.9  # into the project venv, not the system
	$(PY) -m uv pip compile --quiet --generate-hashes --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 requirements.in -o requirements.lock

# Two pytest workers (the suite is mostly subprocesses on the stand-in); --dist loadfile keeps a test
# file on one worker, so its module fixtures (a trained demo run, a served model) are made once.
test: setup  ## run the test suite (installs what it needs first)
	$(VENV)/bin/ruff check  # the lint rules: pyproject.toml [tool.ruff]
	$(VENV)/bin/ruff format --check  # `ruff format` applies it
	bash scripts/install_test_deps.sh
	env $(foreach v,$(USER_VARS),-u HL_$(v)) $(PY) -m pytest -q -rs -n 2 --dist loadfile  # tests choose their own HL_* values

# ---- the stages -------------------------------------------------------------------------------
stand-in: setup  ## write the tiny stand-in model folder (STAND_IN_DIR, default artifacts/stand-in)
	$(PY) -m hunyuan_lora.stand_in

download: setup  ## download the model from ModelScope (pinned revision), verify it
	$(PY) scripts/download.py

patch: setup  ## define the missing `logger` in the model's hunyuan.py (keeps hunyuan.py.orig)
	$(PY) scripts/patch.py

dataset: setup  ## fetch + validate + tokenize the dataset into OUTPUT_DIR/data
	$(PY) scripts/dataset.py

.PHONY: check
check: setup  ## preflight, no weights loaded: config, model folder, patch, dataset, resume, disk, GPU memory
	$(CHECK_ENV) $(PY) scripts/check.py

train: setup  ## LoRA fine-tune with HF Trainer + SwanLab (resume: auto); LAUNCH=zero3 NPROC=8: DeepSpeed ZeRO-3
	$(TRAIN_LAUNCHER) scripts/train.py

infer: setup  ## answer PROMPT (or infer.prompts / infer.input_jsonl) with base + adapter
	$(PY) scripts/infer.py

merge: setup  ## merge the adapter into the bf16 base weights shard by shard (no GPU needed) -> OUTPUT_DIR/merged, checked
	$(PY) scripts/merge.py

.PHONY: clean-cache
clean-cache: setup  ## delete the NF4 cache of the model folder (model.nf4_cache) and leftovers of killed writes
	$(PY) scripts/clean_cache.py

.PHONY: chat eval serve
chat: setup  ## talk to base + adapter (or MODEL_DIR=<merged folder>) in the terminal; /think /base /reset /exit
	$(PY) scripts/chat.py

eval: setup  ## base vs adapter on the held-out split or EVAL=file: BLEU-4, ROUGE, exact match -> OUTPUT_DIR/eval
	$(PY) scripts/eval.py

serve: setup  ## OpenAI-compatible API on serve.host:port (127.0.0.1:8000) over base + adapter
	$(PY) scripts/serve.py

.PHONY: watch
watch: setup  ## SwanLab dashboard on OUTPUT_DIR/swanlog at swanlab.host:port (e.g. CONFIG=configs/demo.yaml)
	$(PY) scripts/watch.py

BENCH_ARGS ?= --real-config --profile
bench: setup  ## GPU benchmark at the real width, reduced depth: upstream vs fast MoE (bench/results/)
	@test -f .bench_data/lengths.json || test -f "$${HL_DATA:-../shared/data/huanhuan.json}" || { echo "make bench: \
	  no dataset at $${HL_DATA:-../shared/data/huanhuan.json} for realistic lengths: pass DATA=<alpaca json>" >&2; exit 2; }
	test -f .bench_data/lengths.json || $(PY) bench/run.py --write-lengths "$${HL_DATA:-../shared/data/huanhuan.json}" .bench_data/lengths.json
	$(PY) bench/run.py $(BENCH_ARGS) --lengths .bench_data/lengths.json --out-dir bench/results

.PHONY: probe
probe: setup  ## the config's training on random weights, measured: memory, s/step, samples/s, ETA, fits? (PROBE_STEPS PROBE_LAYERS PROBE_LENGTHS PROBE_COMPARE)
	$(PY) scripts/probe.py

demo: CONFIG = configs/demo.yaml
demo: setup  ## stand-in -> patch -> dataset -> train -> infer, CPU, offline (the first quick-start)
	$(PY) -m hunyuan_lora.stand_in
	HL_MODEL_DIR="$$HL_STAND_IN_DIR" $(PY) scripts/patch.py
	HL_MODEL_DIR="$$HL_STAND_IN_DIR" $(PY) scripts/dataset.py
	HL_MODEL_DIR="$$HL_STAND_IN_DIR" $(PY) scripts/train.py --set train.resume=never
	HL_MODEL_DIR="$$HL_STAND_IN_DIR" HL_PROMPT= $(PY) scripts/infer.py

# --- container ---
# The image (Dockerfile): NVIDIA container toolkit + driver >= 580 on the host (torch 2.11.0 is the
# CUDA 13.0 build). The volumes hold what must outlive a container: weights (/models), data (/data),
# runs and SwanLab logs (/outputs).
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
# CONFIG / SET / PROMPT given on this command line are handed to the container's make by name (-e
# HL_<NAME>: the value travels in the environment). Host paths are not: inside, the configs' models/
# data/ outputs/ are the volumes (MODELS_VOLUME -> /models ...).
DOCKER_MAKE_VARS = $(foreach v,$(filter CONFIG SET PROMPT,$(TYPED_VARS)),-e HL_$(v))
DOCKER_VOLUMES = -v $(MODELS_VOLUME):/models -v $(DATA_VOLUME):/data -v $(OUTPUTS_VOLUME):/outputs
# --stop-timeout: on `docker stop` training saves a checkpoint after the current step, which on the
# real model takes far longer than docker's default 10 s before SIGKILL.
DOCKER_RUN = docker run --rm --ipc=host --stop-timeout 600 $(if $(DOCKER_GPUS),--gpus $(DOCKER_GPUS)) --user $(DOCKER_USER) \
	$(DOCKER_VOLUMES) -e SWANLAB_API_KEY
# docker-watch publishes the dashboard on this host port, on 127.0.0.1 only (ssh -L to view it).
WATCH_PORT ?= 5092

.PHONY: docker-build docker-train docker-shell docker-watch lint-container buildah-build

docker-build:  ## build the image IMAGE:TAG (labels: source, version, requirements.lock sha256, pins)
	docker build $(addprefix --build-arg=,$(shell IMAGE_VERSION=$(TAG) scripts/image_build_args.sh)) \
	  $(DOCKER_BUILD_ARGS) -t $(IMAGE):$(TAG) .

docker-train:  ## run `make STAGES` (default: train) in the image on all GPUs, with the volumes
	mkdir -p $(MODELS_VOLUME) $(DATA_VOLUME) $(OUTPUTS_VOLUME)
	$(DOCKER_RUN) $(DOCKER_MAKE_VARS) $(IMAGE):$(TAG) $(STAGES)

docker-shell:  ## interactive shell in the image (same GPUs, volumes, user as docker-train)
	mkdir -p $(MODELS_VOLUME) $(DATA_VOLUME) $(OUTPUTS_VOLUME)
	$(DOCKER_RUN) -it --entrypoint bash $(IMAGE):$(TAG)

docker-watch:  ## SwanLab dashboard of the runs in OUTPUTS_VOLUME, from the image, on 127.0.0.1:WATCH_PORT
	HL_SET="swanlab.host=0.0.0.0 swanlab.port=5092 $$HL_SET" docker run --rm -it --user $(DOCKER_USER) $(DOCKER_VOLUMES) \
	  -p 127.0.0.1:$(WATCH_PORT):5092 $(foreach v,$(filter CONFIG PROMPT,$(TYPED_VARS)),-e HL_$(v)) -e HL_SET $(IMAGE):$(TAG) watch

lint-container: setup  ## hadolint the Dockerfile, actionlint the workflows
	$(VENV)/bin/hadolint Dockerfile
	scripts/actionlint.sh

buildah-build:  ## build the Dockerfile without a daemon (buildah on a debootstrap bookworm base; slow)
	bash scripts/buildah_build.sh
# --- end container ---
