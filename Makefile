# The two commands a newcomer needs:  `make demo` (main job) and `make test` (test suite).
# Both create the pinned environment in .venv on first use; later runs reuse it.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.qzoom-installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false
# OpenMP threads that sleep instead of spinning: concurrent processes on few cores stop starving each other.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: venv demo test lint clean-venv

venv: $(STAMP)

$(STAMP): requirements-lock.txt setup.cfg
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -U pip setuptools wheel
	$(VENV)/bin/python -m pip install -q -r requirements-lock.txt
	$(VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qzoom demo $(ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV)
