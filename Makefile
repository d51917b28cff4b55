# The whole set-up on a fresh machine. `make demo` and `make test` create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first: a bare `torch` would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	# openvino too: its INT8 path is tested for real (about 60 MB of CPU-only wheels)
	$(BIN)/pip install --quiet -e '.[dev,openvino]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/linescan demo

test: $(STAMP)
	$(BIN)/ruff check linescan tests tools
	$(BIN)/ruff format --check linescan tests tools
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check linescan tests tools
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python tools/bench.py --markdown

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
