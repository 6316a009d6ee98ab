# Two entry points on a fresh machine: `make demo` and `make test`. Both install into .venv if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.staticprune-installed
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo test test-fast lint-code clean

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

clean:
	rm -rf out .pytest_cache
