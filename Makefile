# cublas_grouped developer targets. GPU targets run from the source tree
# (PYTHONPATH=.) because the GPU machine cannot install packages.
PYTHON ?= python3
OUT ?= .

.PHONY: install test test-gpu lint format bench tune examples

install:
	$(PYTHON) -m pip install ".[cu12,test]"

test:
	$(PYTHON) -m pytest -q tests

test-gpu:
	PYTHONPATH=. $(PYTHON) -m pytest -q -m gpu tests

lint:
	ruff check cublas_grouped tests examples
	ruff format --check cublas_grouped tests examples

format:
	ruff format cublas_grouped tests examples

bench:
	PYTHONPATH=. $(PYTHON) -m cublas_grouped.bench --json $(OUT)/bench.json --plot $(OUT)/bench.png

tune:
	PYTHONPATH=. $(PYTHON) -m cublas_grouped.tune

examples:
	PYTHONPATH=. $(PYTHON) examples/moe_block.py
	PYTHONPATH=. $(PYTHON) examples/compare_padded.py
