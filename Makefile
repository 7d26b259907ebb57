# The two entry points of the README. Both build .venv first (scripts/setup.sh) when needed.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-fast setup
demo: $(VENV)/.ready
	$(PY) -m armor_vllm.demo

test: $(VENV)/.ready
	$(PY) -m pytest -q -ra

test-fast: $(VENV)/.ready
	$(PY) -m pytest -q -ra -m "not slow"

setup: $(VENV)/.ready
$(VENV)/.ready: scripts/setup.sh pyproject.toml
	bash scripts/setup.sh
	touch $@
