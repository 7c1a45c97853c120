# scalelab — every command a newcomer needs. `.venv` is created on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
STUDY  ?= examples/quickstart.toml
OUT    ?= runs/quickstart

.PHONY: demo test test-slow test-all bench lint format clean venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Installs are stamped so that repeated `make` calls take seconds.
$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install --quiet -c constraints.txt -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install --quiet -c constraints.txt -e '.[dev,ray,serve,hf,mlflow,tensorboard,wandb,notebook,gpu,slurm]'
	touch $@

venv: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(BIN)/scalelab study run $(STUDY) --out $(OUT) --parallel 2
	$(BIN)/scalelab fit $(OUT)
	$(BIN)/scalelab report $(OUT)
	@echo "Report: $(OUT)/report/index.html"

# The default suite (tests marked slow are deselected in pyproject.toml's addopts).
test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest

test-slow: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -m slow

test-all: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -m "slow or not slow"

# Every benchmark at its modest default size; one table in bench/results.md (+ results.json).
bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/run_all.py --out bench

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(VENV)/.installed-dev
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) runs bench .pytest_cache .ruff_cache
