# fastgpt: `make test` (the test suite), `make bench` (the decode benchmark against Hugging Face)
# and `make gpu-check` (the one prepared command for a lent GPU machine).
#
# `make test` and `make bench` install what is missing first, so they work in a fresh virtual
# environment (`.ci/run` proves it). On a CPU machine torch is pinned to the local CPU wheel (an
# unpinned torch pulls GBs of CUDA packages). `make gpu-check` installs nothing and never calls
# pip: the GPU image has everything and no network.

PYTHON ?= python3
RESULTS_DIR ?= benchmarks/results
export RESULTS_DIR

CPU_TORCH   := torch==2.13.0
# A couple of retries for transient network errors; fail fast where there is no network.
PIP_INSTALL := $(PYTHON) -m pip install -q --retries 2 --timeout 10

# package-spec:module-to-import, each installed only when its import fails (all in one pip call).
RUNTIME_DEPS := numpy:numpy triton==3.6.0:triton safetensors:safetensors
HF_PINNED    := transformers==5.17.0:transformers
# ninja builds the top-k op (CPU and CUDA); scipy: the statistical tests; tqdm and matplotlib: the
# benchmark tools the tests exercise.
TEST_DEPS    := pytest:pytest scipy:scipy ninja:ninja tqdm:tqdm matplotlib:matplotlib
BENCH_DEPS   := pytest-benchmark:pytest_benchmark ninja:ninja matplotlib:matplotlib tqdm:tqdm

# $(call install_missing,DEPS): one pip install of every package of DEPS whose module is missing.
define install_missing
	@missing=""; for dep in $(1); do \
	    $(PYTHON) -c "import $${dep##*:}" 2>/dev/null || missing="$$missing $${dep%:*}"; \
	done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; $(PIP_INSTALL) $$missing; fi
endef

.PHONY: help torch-cpu install test-deps test test-hf-latest bench gpu-check clean

help:
	@echo "make test            install what is missing, run the test suite (CPU: Triton kernels in the interpreter)"
	@echo "make test-hf-latest  the HF-compatibility tests against the newest transformers release"
	@echo "make bench           install what is missing, run the decode benchmark (fastgpt vs Hugging Face generate)"
	@echo "make gpu-check       on a GPU machine, installing nothing: smoke, headline, CUDA tests, benchmarks"
	@echo "                     -> \$$RESULTS_DIR/gpu_check.jsonl (written as it goes) and gpu_check.json"

# torch first and pinned, so nothing later resolves an unpinned (CUDA) torch.
torch-cpu:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP_INSTALL) "$(CPU_TORCH)"

test-deps: torch-cpu
	$(call install_missing,$(RUNTIME_DEPS) $(HF_PINNED) $(TEST_DEPS))

install: torch-cpu
	$(call install_missing,$(RUNTIME_DEPS) $(HF_PINNED) $(BENCH_DEPS))
	@$(PYTHON) -m pip show -q fastgpt >/dev/null 2>&1 || \
	    $(PIP_INSTALL) --no-deps --no-build-isolation -e . \
	    || echo "warning: editable install failed; running from the source tree"

test: test-deps
	PYTHONPATH=$(CURDIR) $(PYTHON) -m pytest tests -q -rs

# The parity tests against the newest transformers release (a second environment in CI).
test-hf-latest: torch-cpu
	$(PIP_INSTALL) --upgrade transformers
	$(call install_missing,$(RUNTIME_DEPS) $(TEST_DEPS))
	@$(PYTHON) -c "import transformers; print('transformers', transformers.__version__)"
	PYTHONPATH=$(CURDIR) $(PYTHON) -m pytest tests/test_hf_compat.py -q -rs

bench: install
	PYTHONPATH=$(CURDIR) $(PYTHON) -m benchmarks.decode

# No install step and no pip: the GPU machine has no network. Results go to RESULTS_DIR when
# given (RESULTS_DIR=$$OUT on a lent machine), else to $(GPU_CHECK_DEFAULT_DIR), never into the
# tracked benchmarks/results/ (`python -m benchmarks.gpu_check --unpack` writes there on purpose).
# The budget is GPU_CHECK_BUDGET_S (default 420 s).
GPU_CHECK_DEFAULT_DIR := /tmp/fastgpt-gpu-check
gpu-check:
	PYTHONPATH=$(CURDIR) $(PYTHON) -m benchmarks.gpu_check \
	    --results-dir "$(if $(filter file,$(origin RESULTS_DIR)),$(GPU_CHECK_DEFAULT_DIR),$(RESULTS_DIR))"

clean:
	rm -rf build .pytest_cache .benchmarks *.egg-info
