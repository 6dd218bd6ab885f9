# Two commands for a fresh machine (see README):  make train   |   make test
# Both create .venv and install torch 2.13 + this package on first use; `make test` adds the test extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU-only machines can take the small CPU wheel: make TORCH_INDEX=https://download.pytorch.org/whl/cpu train
TORCH_INDEX ?=
TORCH_PIN := torch==2.13.0
# Checked before anything is installed: Python 3.10 and older fail late and obscurely otherwise.
CHECK_PYTHON := import sys; sys.exit(0 if sys.version_info >= (3, 11) else \
	"error: Meshtron needs Python >= 3.11, and $(PYTHON) is " + sys.version.split()[0] + \
	": run make PYTHON=python3.11 (or newer)")

.PHONY: setup setup-test train test test-fast lint clean

setup: $(VENV)/.installed

setup-test: $(VENV)/.installed-test

# What training needs: torch and the package's own dependencies.
$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c '$(CHECK_PYTHON)'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PIN) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e .
	touch $@

# What the tests and the linter need on top (pytest, ruff, transformers, matplotlib, tensorboard).
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

train: setup
	$(PY) -m train $(ARGS)

test: setup-test
	$(PY) -m pytest $(ARGS)

test-fast: setup-test
	$(PY) -m pytest -m "not slow" $(ARGS)

lint: setup-test
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) outputs
