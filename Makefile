# Every target creates the environment first when it is missing (see scripts/setup_env.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.varlib-installed

.PHONY: setup test test-fast test-gpu gpu-check demo demo-text bench clean

$(STAMP): pyproject.toml scripts/setup_env.sh
	VENV=$(VENV) bash scripts/setup_env.sh

setup: $(STAMP)

## the whole suite, one worker per core (pytest-xdist's worksteal: each worker starts on its half of the tests,
## whole files mostly, so module fixtures are built about once, and an idle worker takes tests from the other), in
## a random order (pytest-randomly prints its seed in the header; `make test PYTEST_ARGS=--randomly-seed=N` repeats an
## order); tests marked slow (subprocess training, notebooks) take up to a minute each on CPU; the 30 slowest are
## listed at the end
PYTEST_WORKERS ?= auto
test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist worksteal --durations=30 $(PYTEST_ARGS) tests

## the suite without the slow tests: models, data, losses, configs, one-process training (a few minutes)
test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist worksteal -m "not slow" tests

## the CUDA-only paths (tests/gpu: FlexAttention's backward, auto -> flex, bf16 FSDP2, fused AdamW, the compiled
## sampler) on a machine with a GPU; any Python with CUDA torch, einops, safetensors, tqdm, numpy and pytest will do:
## make test-gpu PY=python3 (varlib is imported from src/)
test-gpu:
	PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} $(PY) -m pytest -q -m gpu tests/gpu

## the GPU checks in one command of at most 8 minutes on one GPU (tests/gpu and a recompile log of benchmarks/gpu.py
## at d16), written to gpu_check_report.txt: make gpu-check PY=python3 [WHEELS=dir: install varlib's other
## dependencies from a local wheel folder, keeping the preinstalled torch]; DRY_RUN=1 without a GPU
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	PY=$(GPU_PY) WHEELS=$(WHEELS) DRY_RUN=$(DRY_RUN) bash scripts/gpu_check.sh

demo: $(STAMP)
	$(VENV)/bin/varlib-demo

## text-to-image on the captioned emoji (reuses make demo's tokenizer when it ran): outputs/demo_text/
demo-text: $(STAMP)
	$(VENV)/bin/varlib-demo-text

bench: $(STAMP)
	$(PY) benchmarks/speed.py

clean:
	rm -rf outputs multirun lightning_logs .pytest_cache
