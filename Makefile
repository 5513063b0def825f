# cublas_grouped developer targets. GPU targets run from the source tree
# (PYTHONPATH=.) because the GPU machine cannot install packages.
PYTHON ?= python3
OUT ?= .

.PHONY: install test test-gpu lint format bench tune examples mutation kernel-mutants

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

# Mutation testing of the host-side logic (mutmut, CPU suite; minutes, not CI).
# Score and survivors: $(OUT)/mutation.json and docs/testing.md; mutants/ keeps
# the run for `mutmut show NAME` (delete it when done).
mutation:
	rm -rf mutants
	$(PYTHON) tools/mutation.py run
	$(PYTHON) tools/mutation.py report --json $(OUT)/mutation.json

# Kernel mutants on the GPU (tools/kernel_mutants.py): one-line kernel bugs, each
# run alone against the GPU suite's fast subset. Table on stdout, JSON in $(OUT).
# KM_ARGS="--shard 1/3" splits the run; KM_ARGS="--check" only compiles (no GPU).
KM_ARGS ?=
kernel-mutants:
	$(PYTHON) tools/kernel_mutants.py $(KM_ARGS) --json $(OUT)/kernel_mutants.json

# Expert parallelism on 2+ GPUs of one host (skipped with fewer): tests, then the 1/2/4-GPU benchmark.
.PHONY: test-ep bench-ep
test-ep:
	PYTHONPATH=. $(PYTHON) -m pytest -q -m gpu tests/test_distributed_gpu.py

bench-ep:
	PYTHONPATH=. $(PYTHON) -m cublas_grouped.tools.ep_bench --gpus 1,2,4 --tokens 64,4096,8192 --json $(OUT)/ep_bench.json
