# Two entry points the README opens with: `make train` and `make test`. Each sets up what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
OPENBLAS := /usr/lib/x86_64-linux-gnu/libopenblas.so.0

.PHONY: setup setup-test train test

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# OpenBLAS makes the Linux mlx[cpu] wheel ~10x faster; golang renders Ollama templates in the tests;
# cmake builds llama.cpp for the GGUF checks. macOS needs none of them.
system-deps:
	@if [ "$$(uname)" = "Linux" ] && command -v apt-get >/dev/null; then \
	  missing=""; \
	  for p in libopenblas0-pthread golang-go cmake build-essential; do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	  fi; \
	fi

setup: $(BIN)/python system-deps
	$(BIN)/pip install -q -e .

setup-test: $(BIN)/python system-deps
	$(BIN)/pip install -q -e ".[test]"

train: setup
	$(BIN)/mlxtune lora --iters 1000

test: setup-test
	LD_PRELOAD=$$( [ -f $(OPENBLAS) ] && echo $(OPENBLAS) ) $(BIN)/python -m pytest -q
