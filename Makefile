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

# Two workers (pytest-xdist): much of the suite waits on subprocesses and SLURM, not on the CPU.
TEST_WORKERS ?= 2

test: lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=15

clean:
	rm -rf outputs .pytest_cache .ruff_cache
