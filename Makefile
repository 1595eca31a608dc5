# Every target creates the environment first when it is missing (see scripts/setup_env.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.varlib-installed

.PHONY: setup test test-fast test-gpu demo demo-text bench clean

$(STAMP): pyproject.toml scripts/setup_env.sh
	VENV=$(VENV) bash scripts/setup_env.sh

setup: $(STAMP)

## the whole suite, one worker per core (pytest-xdist; a test file stays on one worker, so its module fixtures are
## built once); tests marked slow (subprocess training, notebooks) take up to a minute each on CPU
PYTEST_WORKERS ?= auto
test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile tests

## the suite without the slow tests: models, data, losses, configs, one-process training (a few minutes)
test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m "not slow" tests

## the CUDA-only paths (tests/gpu: FlexAttention's backward, auto -> flex, bf16 FSDP2, fused AdamW, the compiled
## sampler) on a machine with a GPU; any Python with CUDA torch, einops, safetensors, tqdm, numpy and pytest will do:
## make test-gpu PY=python3 (varlib is imported from src/)
test-gpu:
	PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} $(PY) -m pytest -q -m gpu tests/gpu

demo: $(STAMP)
	$(VENV)/bin/varlib-demo

## text-to-image on the captioned emoji (reuses make demo's tokenizer when it ran): outputs/demo_text/
demo-text: $(STAMP)
	$(VENV)/bin/varlib-demo-text

bench: $(STAMP)
	$(PY) benchmarks/speed.py

clean:
	rm -rf outputs multirun lightning_logs .pytest_cache
