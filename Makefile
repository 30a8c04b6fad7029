# ray-rerank: `make demo` and `make test` work on a fresh machine (they create .venv).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
TORCH_VERSION ?= 2.13.0
DEMO_DIR ?= out/demo
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install demo test lint typecheck check bench clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

install: $(BIN)/.installed

demo: install
	@mkdir -p $(DEMO_DIR)
	$(PY) -m jobs.sample write $(DEMO_DIR)/sample.parquet
	$(PY) -m jobs.rescore --input $(DEMO_DIR)/sample.parquet --output $(DEMO_DIR)/scored \
		--group-column qid --rank --overwrite
	$(PY) -m jobs.sample show $(DEMO_DIR)/scored --k 3

test: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

check: lint typecheck test

bench: install
	$(PY) -m bench.rescore_bench
	$(PY) bench/serve_load.py

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
