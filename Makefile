# ehrmem developer and demo entry points. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
DEMO_OUT ?= ehrmem-demo

.PHONY: venv install demo test test-slow lint typecheck bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# A CPU build of torch first: a plain `torch` requirement would pull a CUDA build of several GB.
	$(PIP) install --quiet "torch==$(TORCH_VERSION)"
	$(PIP) install --quiet -e ".[dev,embeddings]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/ehrmem demo --out $(DEMO_OUT)

test: install
	$(PY) -m pytest -q -m "not slow"; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

test-slow: install
	$(PY) -m pytest -q -m slow -s

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

typecheck: install
	$(VENV)/bin/mypy

bench: install
	$(PY) benchmarks/bench_scoring.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache .mypy_cache
