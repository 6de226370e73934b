# Everything a newcomer needs, from nothing: `make demo`, `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

# The one CellProfiler the project runs (the container's), named in image/cellprofiler.mk.
include image/cellprofiler.mk
# CELLPROFILER=4 (default): that release, as the container runs it.
# CELLPROFILER=5: the opt-in 5.0 nightly (Python 3.11, no Java), e.g. `make CELLPROFILER=5 test`.
CELLPROFILER ?= 4

# Finds the first interpreter of the given minor versions (pyenv shims exist for versions that are
# not active, so each candidate is run).
find_python = $(shell for v in $(1); do for p in $$HOME/.pyenv/versions/$$v.*/bin/python$$v $$(command -v python$$v); do \
	  "$$p" -c "import sys; assert sys.version_info[:2] == tuple(map(int, '$$v'.split('.')))" 2>/dev/null \
	  && { echo "$$p"; exit 0; }; done; done)

ifeq ($(CELLPROFILER),5)
CP_VENV := .venv-cp5
CP_LABEL := CellProfiler 5.0 nightly (opt-in; NOT what the container runs)
CP_PYTHON := $(PYTHON)
CP_ARGS := -e imageio_reader imageio_reader_v3
else
CP_VENV := .venv-cp
CP_LABEL := CellProfiler $(CELLPROFILER_PYPI) (the container's $(CELLPROFILER_TAG))
# The container runs CellProfiler on Python 3.8 (/opt/venv); 3.9 works too.
CP_PYTHON ?= $(call find_python,3.8 3.9)
CP_ARGS :=
# python-javabridge compiles against a JDK; found from javac unless JAVA_HOME is set.
JAVA_HOME ?= $(shell j="$$(command -v javac)" && dirname "$$(dirname "$$(readlink -f "$$j")")")
endif
CP_NIGHTLY := 5.0.0.dev784

# Python 3.8, the oldest Python the worker supports (the container's), for worker tests.
PYTHON38 ?= $(call find_python,3.8)
PY38_VENV := .venv-py38

export CPB_CELLPROFILER ?= $(CURDIR)/$(CP_VENV)/bin/cellprofiler
export CPB_CELLPROFILER_ARGS ?= $(CP_ARGS)
export OMP_NUM_THREADS := 1
export OPENBLAS_NUM_THREADS := 1

.PHONY: test demo local bench venv analysis cellprofiler py38 clean cloud-smoke

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	@echo "setup: $(VENV) with Pulumi, moto and the cpb client (first run only, about a minute)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# pip freeze (stdin) minus the packages requirements-analysis.txt pins itself (names compared as PEP 503 says).
define ANALYSIS_CONSTRAINTS
import re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
own = {norm(m.group(1)) for m in re.finditer(r"^([A-Za-z0-9_.-]+)==", open(sys.argv[1]).read(), re.M)}
sys.stdout.writelines(l for l in sys.stdin if norm(l.split("==")[0]) not in own)
endef
export ANALYSIS_CONSTRAINTS

# Downstream analysis (CytoTable, pycytominer, matplotlib) goes INTO .venv: pip is held to every version
# already there (pip freeze as constraints), so Pulumi's and moto's pins never move; it resolves so today.
$(VENV)/.analysis-installed: requirements-analysis.txt $(VENV)/.installed
	@echo "setup: CytoTable, pycytominer and matplotlib into $(VENV) (first run only, under a minute)"
	$(PY) -m pip freeze --exclude-editable | $(PY) -c "$$ANALYSIS_CONSTRAINTS" requirements-analysis.txt \
	  > $(VENV)/constraints-before-analysis.txt
	$(PY) -m pip install -q -c $(VENV)/constraints-before-analysis.txt -r requirements-analysis.txt
	touch $@

# CellProfiler 4.2 (default): headless, no wxPython/mysqlclient; python-javabridge built from
# source against the JDK after numpy/Cython are in place (--no-build-isolation).
.venv-cp/.installed: requirements-cellprofiler.txt requirements-cellprofiler-build.txt image/cellprofiler.mk
	@if [ -z "$(CP_PYTHON)" ]; then echo "make: $(CP_LABEL) needs Python 3.8 or 3.9 (none found: install one, e.g. \`pyenv install 3.8\`, or set CP_PYTHON=/path/to/python3.8)" >&2; exit 1; fi
	@if [ -z "$(JAVA_HOME)" ] || [ ! -x "$(JAVA_HOME)/bin/javac" ]; then echo "make: $(CP_LABEL) needs a JDK to build python-javabridge (none found: install one, e.g. \`apt install openjdk-17-jdk-headless\`, or set JAVA_HOME)" >&2; exit 1; fi
	@echo "setup: .venv-cp with headless $(CP_LABEL) on $$($(CP_PYTHON) --version) (first run only, about a minute)"
	rm -rf .venv-cp
	$(CP_PYTHON) -m venv .venv-cp
	.venv-cp/bin/python -m pip install -q --upgrade 'pip<25'
	.venv-cp/bin/python -m pip install -q -r requirements-cellprofiler-build.txt
	JAVA_HOME="$(JAVA_HOME)" .venv-cp/bin/python -m pip install -q --no-build-isolation -r requirements-cellprofiler.txt
	.venv-cp/bin/python -m pip install -q --no-deps cellprofiler==$(CELLPROFILER_PYPI)
	@v="$$(.venv-cp/bin/cellprofiler --version 2>/dev/null | tail -n 1)"; [ "$$v" = "$(CELLPROFILER_PYPI)" ] \
	  || { echo "make: .venv-cp/bin/cellprofiler --version says '$$v', expected $(CELLPROFILER_PYPI)" >&2; exit 1; }
	printf '%s\n' "$(CP_ARGS)" > .venv-cp/cpb-cellprofiler-args
	touch $@

# CellProfiler 5.0 nightly (opt-in): Python 3.11, imageio readers instead of Bio-Formats, no Java.
.venv-cp5/.installed: requirements-cellprofiler5.txt
	@echo "setup: .venv-cp5 with headless $(CP_LABEL) (first run only, about a minute)"
	$(CP_PYTHON) -m venv .venv-cp5
	.venv-cp5/bin/python -m pip install -q --upgrade pip
	.venv-cp5/bin/python -m pip install -q --no-deps cellprofiler-nightly==$(CP_NIGHTLY)
	.venv-cp5/bin/python -m pip install -q -r requirements-cellprofiler5.txt
	printf '%s\n' "$(CP_ARGS)" > .venv-cp5/cpb-cellprofiler-args
	touch $@

$(PY38_VENV)/.installed: image/requirements.txt
	@if [ -z "$(PYTHON38)" ]; then echo "python3.8 not found: worker 3.8 tests will be skipped (set PYTHON38=/path/to/python3.8)"; exit 0; fi; \
	echo "setup: $(PY38_VENV) with $(PYTHON38) and boto3 (the container's Python, for worker tests)"; \
	$(PYTHON38) -m venv $(PY38_VENV) && $(PY38_VENV)/bin/python -m pip install -q -r image/requirements.txt && touch $@

venv: $(VENV)/.installed $(VENV)/.analysis-installed
analysis: $(VENV)/.analysis-installed
cellprofiler: $(CP_VENV)/.installed
py38: $(PY38_VENV)/.installed

test: venv cellprofiler py38
	$(PY) -m pytest -q tests

demo: venv cellprofiler
	$(PY) -m cpb demo

# The whole stack on this machine, in the foreground until Ctrl-C (AWS emulated on 127.0.0.1:4747).
# Options go in LOCAL_ARGS, e.g. `make local LOCAL_ARGS="--state-dir ~/.cpb/local-state --set jobMaxVcpus=8"`.
local: venv cellprofiler
	$(PY) -m cpb local up $(LOCAL_ARGS)

bench: venv cellprofiler
	$(PY) -m bench

# For an AWS account holder: deploy a NEW throw-away stack with the dev settings, run the demo plate on
# it, check the counts, destroy it (always, also on failure or Ctrl-C). Says its cost and time first.
cloud-smoke: venv
	@if [ -z "$(STACK)" ]; then echo "usage: make cloud-smoke STACK=<new stack name> [REGION=eu-west-1] [YES=1]" >&2; exit 2; fi
	$(PY) -m tools.cloud_smoke --stack "$(STACK)" $(if $(REGION),--region "$(REGION)") $(if $(YES),--yes)

clean:
	rm -rf $(VENV) .venv-cp .venv-cp5 $(PY38_VENV) .pytest_cache demo-output
