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

# A pytest-xdist worker per core, at most 4 (tests/conftest.py gives each worker one torch thread); work-stealing
# keeps both cores busy until the last long test ends. TEST_WORKERS=0 runs the tests one after the other.
TEST_WORKERS ?= auto
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --maxprocesses 4 --dist worksteal

test: install
	$(PYTEST) $(ARGS)

test-fast: install
	$(PYTEST) -m "not slow" $(ARGS)

bench: install
	$(BIN)/ldm-bench $(ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
