# scaletrain — the two commands of a fresh checkout are `make demo` and `make test`.
#
#   make bootstrap   Debian packages + .venv with torch (run by every target below when needed)
#   make build       configure (once) and build library, CLI, Python module, tests, benchmarks
#   make demo        train the demo GPT on FLOWROLL/DIMMATCH (configs/tiny_cpu.yaml)
#   make test        C++ tests (ctest) and Python tests (pytest)
#   make wheel       the Python wheel (pyproject.toml, scikit-build-core) in dist/
#   make bench       C++ micro-benchmarks
#   make install     install library, headers, CLI and CMake package into PREFIX (/usr/local)
#   make gpu-test    on a GPU host: tools/gpu/run_tests.sh
#   make clean       remove the build folder
SHELL := /bin/bash
ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
VENV ?= $(ROOT)/.venv
PYTHON := $(VENV)/bin/python
BUILD ?= $(ROOT)/build
JOBS ?= $(shell nproc)
PREFIX ?= /usr/local
CMAKE_ARGS ?=

.PHONY: all bootstrap configure build demo test test-cpp test-python wheel test-wheel bench install gpu-test clean

all: build

bootstrap:
	@bash $(ROOT)/tools/bootstrap.sh

configure: bootstrap
	@if [ ! -f $(BUILD)/build.ninja ]; then \
	  cmake -S $(ROOT) -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release \
	    -DSCALETRAIN_PYTHON_EXECUTABLE=$(PYTHON) $(CMAKE_ARGS); fi

build: configure
	@cmake --build $(BUILD) -j $(JOBS)

demo: build
	$(BUILD)/scaletrain train --config $(ROOT)/configs/tiny_cpu.yaml

test: build
	@$(MAKE) --no-print-directory test-cpp test-python test-wheel

test-cpp:
	cd $(BUILD) && ctest -j $(JOBS) --output-on-failure

test-python:
	cd $(ROOT) && SCALETRAIN_BUILD=$(BUILD) $(PYTHON) -m pytest -q -rs

# Built against the .venv's torch (no build isolation: the wheel must link the torch it will load).
wheel: bootstrap
	cd $(ROOT) && $(PYTHON) -m pip wheel --no-build-isolation --no-deps -w dist .

# The wheel in a fresh venv that sees the same torch (the .venv's site-packages through a .pth
# file) but not this source tree: import, a flash-attention step, the loss scaler.
test-wheel: wheel
	@bash $(ROOT)/tools/test_wheel.sh $(PYTHON) $(ROOT)/dist

bench: build
	$(BUILD)/benchmarks/cpp/scaletrain_bench

install: build
	cmake --install $(BUILD) --prefix $(PREFIX)

gpu-test:
	bash $(ROOT)/tools/gpu/run_tests.sh

clean:
	rm -rf $(BUILD)
