# `make demo`: set everything up and run the default experiment. `make test`: set up, lint, type-check and run the tests.
# `make test-fast`: the same without the tests marked slow (subprocesses, servers, torchrun; under a minute on 2 cores).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pytest worker processes (pytest-xdist), one per core of the 2-core machine; each uses one torch thread.
WORKERS ?= 2

# `make test-labelstudio`: the tests against a real Label Studio (the PyPI package, pinned below, in its own venv
# .venv-labelstudio: its Django-era pins never touch .venv), started by the tests themselves.
LS_VENV := .venv-labelstudio
LABEL_STUDIO_VERSION := 1.23.2
LS_STAMP := $(LS_VENV)/.installed-$(LABEL_STUDIO_VERSION)

.PHONY: demo test test-fast lint format clean labelstudio-env test-labelstudio

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/saal run

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/python tools/check_function_length.py
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(WORKERS)

test-fast: lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(WORKERS) -m "not slow"

$(LS_STAMP):
	test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LS_VENV)/bin/python -m pip install --quiet 'label-studio==$(LABEL_STUDIO_VERSION)'
	touch $(LS_STAMP)

labelstudio-env: $(LS_STAMP)

test-labelstudio: $(STAMP) $(LS_STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m labelstudio tests/labelstudio

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/python tools/check_function_length.py

format: $(STAMP)
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

clean:
	rm -rf $(VENV) $(LS_VENV) runs .pytest_cache
