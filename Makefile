# Two entry points the README opens with: `make train` and `make test`. Each sets up what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
OPENBLAS := /usr/lib/x86_64-linux-gnu/libopenblas.so.0

.PHONY: setup setup-test system-deps train test

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# OpenBLAS makes the Linux mlx[cpu] wheel ~10x faster; golang renders Ollama templates in the tests;
# cmake builds llama.cpp for the GGUF checks; chromium renders `mlxtune compare --html` pages headless in the
# tests. macOS needs none of them.
system-deps:
	@if [ "$$(uname)" = "Linux" ] && command -v apt-get >/dev/null; then \
	  missing=""; \
	  for p in libopenblas0-pthread golang-go cmake build-essential chromium; do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	  fi; \
	fi

setup: $(BIN)/python system-deps
	$(BIN)/pip install -q -e .

# llama-cpp-python builds llama.cpp from source (minutes). Portable x86 flags: GGML_NATIVE would compile
# AMX kernels on CPUs that advertise AMX inside VMs that forbid it, and quantized models then segfault.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF

# The wheel is built here, into a folder named after the version and the flags, and installed from there:
# pip's own wheel cache would hand back a wheel built earlier with other flags (a native AVX512 build rounds
# F16 otherwise than the tests' emulation of this portable one).
LLAMA_CPP_VERSION := 0.3.36
LLAMA_WHEELS := .whl/llama-cpp-python-$(LLAMA_CPP_VERSION)-$(shell echo "$(LLAMA_CMAKE_ARGS)" | cksum | cut -d' ' -f1)

setup-test: $(BIN)/python system-deps
	@if [ "$$(uname -m)" = "x86_64" ]; then \
	  if ! ls $(LLAMA_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1; then \
	    echo "building llama.cpp (llama-cpp-python $(LLAMA_CPP_VERSION)) with portable flags: several minutes, once"; \
	    CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip wheel -q --no-cache-dir --no-deps --no-binary llama-cpp-python \
	      "llama-cpp-python==$(LLAMA_CPP_VERSION)" -w $(LLAMA_WHEELS); \
	  fi; \
	  $(BIN)/pip install -q --no-deps --force-reinstall $(LLAMA_WHEELS)/llama_cpp_python-*.whl; \
	fi
	$(BIN)/pip install -q -e ".[test]"

train: setup
	$(BIN)/mlxtune lora --iters 1000

test: setup-test
	$(BIN)/ruff check mlxtune tests benchmarks scripts
	LD_PRELOAD=$$( [ -f $(OPENBLAS) ] && echo $(OPENBLAS) ) $(BIN)/python -m pytest -q
