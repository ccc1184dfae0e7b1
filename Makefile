# Everything runs from a project-local virtual environment created from scratch.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: install demo test test-fast bench clean

$(BIN)/ldm-train: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# The CPU build of torch (a CUDA build is pulled by an unpinned `torch` on machines without one cached).
	$(BIN)/pip install "torch==2.13.0" || $(BIN)/pip install torch
	$(BIN)/pip install -e ".[test]"
	touch $@

install: $(BIN)/ldm-train

# The main job: both stages on the built-in synthetic dataset (CPU-sized), then a sample grid.
demo: install
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/ldm-train experiment=demo $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

bench: install
	$(BIN)/ldm-bench $(ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
