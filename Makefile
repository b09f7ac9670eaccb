# Two commands do all the set-up: `make demo` and `make test`. Both create/reuse .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo distill-demo test lint format clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m pretraining.train experiment=demo

# Distils the demo encoder (made first by `make demo`'s run if missing) into two small students.
distill-demo: $(STAMP)
	$(PY) -m distillation.train experiment=distill_demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Three pytest-xdist workers, also on 2 cores: one of them mostly waits on the SLURM jobs while
# the other two keep the cores busy (measured on 2 cores: docs/performance.md, "The test suite").
TEST_WORKERS ?= 3

test: lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=15

clean:
	rm -rf outputs .pytest_cache .ruff_cache
