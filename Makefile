# The two Quickstart commands. Both create the virtual environment once (and again only when
# pyproject.toml changes), then run inside it.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
VARIANT ?= performer
ARGS ?=

.PHONY: train test setup
train: $(VENV)/.installed
	$(PYTHON) -m experiments.train --variant=$(VARIANT) $(ARGS)

test: $(VENV)/.installed
	$(PYTHON) -m pytest -n 2 -q $(ARGS)

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml .ci/setup_venv
	bash .ci/setup_venv $(VENV)
	touch $@
