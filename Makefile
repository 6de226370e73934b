# Everything a newcomer needs, from nothing: `make demo`, `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
CP_VENV := .venv-cp
PY := $(VENV)/bin/python
CELLPROFILER := $(CURDIR)/$(CP_VENV)/bin/cellprofiler
CP_VERSION := 5.0.0.dev784
# Python 3.8, the oldest Python the worker supports (the CellProfiler 4.2 image has 3.9), for worker tests.
# (pyenv shims exist for versions that are not active, so each candidate is tried.)
PYTHON38 ?= $(shell for p in $$HOME/.pyenv/versions/3.8*/bin/python3.8 $$(command -v python3.8); do \
	  "$$p" -c 'import sys; assert sys.version_info[:2] == (3, 8)' 2>/dev/null && { echo "$$p"; break; }; done)
PY38_VENV := .venv-py38

export CPB_CELLPROFILER ?= $(CELLPROFILER)
export OMP_NUM_THREADS := 1
export OPENBLAS_NUM_THREADS := 1

.PHONY: test demo bench venv cellprofiler py38 clean

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	@echo "setup: $(VENV) with Pulumi, moto and the cpb client (first run only, about a minute)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(CP_VENV)/.installed: requirements-cellprofiler.txt
	@echo "setup: $(CP_VENV) with headless CellProfiler $(CP_VERSION) (first run only, about a minute)"
	$(PYTHON) -m venv $(CP_VENV)
	$(CP_VENV)/bin/python -m pip install -q --upgrade pip
	$(CP_VENV)/bin/python -m pip install -q --no-deps cellprofiler-nightly==$(CP_VERSION)
	$(CP_VENV)/bin/python -m pip install -q -r requirements-cellprofiler.txt
	touch $@

$(PY38_VENV)/.installed: image/requirements.txt
	@if [ -z "$(PYTHON38)" ]; then echo "python3.8 not found: worker 3.8 tests will be skipped (set PYTHON38=/path/to/python3.8)"; exit 0; fi; \
	echo "setup: $(PY38_VENV) with $(PYTHON38) and boto3 (the container's Python, for worker tests)"; \
	$(PYTHON38) -m venv $(PY38_VENV) && $(PY38_VENV)/bin/python -m pip install -q -r image/requirements.txt && touch $@

venv: $(VENV)/.installed
cellprofiler: $(CP_VENV)/.installed
py38: $(PY38_VENV)/.installed

test: venv cellprofiler py38
	$(PY) -m pytest -q tests

demo: venv cellprofiler
	$(PY) -m cpb demo

bench: venv cellprofiler
	$(PY) -m bench

clean:
	rm -rf $(VENV) $(CP_VENV) $(PY38_VENV) .pytest_cache demo-output
