# The two entry points of the README. Both build .venv first (scripts/setup.sh) when needed.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-fast lint format setup
demo: $(VENV)/.ready
	$(PY) -m armor_vllm.demo

# --durations: the slowest tests in every run's log (CI keeps it), so a slower suite is seen at once
test: $(VENV)/.ready
	$(PY) -m pytest -q -ra --durations=30

test-fast: $(VENV)/.ready
	$(PY) -m pytest -q -ra -m "not slow"

# ruff (lint + format check), configured in pyproject.toml; CI runs it before the tests
lint: $(VENV)/.ready
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.ready
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

setup: $(VENV)/.ready
$(VENV)/.ready: scripts/setup.sh pyproject.toml
	bash scripts/setup.sh
	touch $@
