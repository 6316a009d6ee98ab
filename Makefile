# Two entry points on a fresh machine: `make demo` and `make test`. Both install into .venv if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.staticprune-installed
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo test bench bench-quick plugins test-gpu clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# The CPU build of torch first, pinned, so that no dependency can pull a CUDA build.
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_PIN)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@$(PY) -c "import torch, sys; sys.exit('a CUDA build of torch was installed; expected the CPU build' if torch.version.cuda else 0)"
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/staticprune demo

test: install
	$(PY) -m pytest -q -ra

bench: install
	$(VENV)/bin/staticprune bench-suite -o docs/benchmarks --update-readme README.md

bench-quick: install
	$(VENV)/bin/staticprune bench-suite --quick -o bench-results-quick

# CUDA plugins (TensorRT wrapper too when TENSORRT_INCLUDE_DIR points at TensorRT headers).
plugins:
	cmake -S plugins -B build/plugins $(if $(TENSORRT_INCLUDE_DIR),-DTENSORRT_INCLUDE_DIR=$(TENSORRT_INCLUDE_DIR)) && cmake --build build/plugins -j2

# Kernel tests on a CUDA GPU (skipped in CI, which has none).
test-gpu: install
	$(PY) -m pytest -q -m gpu tests/test_plugin_kernels_gpu.py tests/test_bench.py

clean:
	rm -rf out .pytest_cache
