# fastgpt: `make bench` (the decode benchmark against Hugging Face) and `make test` (the test suite).
# Both install what is missing first. On a CPU machine torch is pinned to the local CPU wheel
# (an unpinned torch pulls GBs of CUDA packages); on the GPU image everything is already there
# and nothing is downloaded (it has no network).

PYTHON ?= python3
RESULTS_DIR ?= benchmarks/results
export RESULTS_DIR

# package-to-install : module-to-import, installed only when the import fails.
CPU_TORCH   := torch==2.13.0
# Fail fast instead of retrying where there is no network (the GPU machine).
PIP_INSTALL := $(PYTHON) -m pip install -q --retries 2 --timeout 10
PY_DEPS     := triton==3.6.0:triton transformers==5.17.0:transformers safetensors:safetensors \
               pytest:pytest pytest-benchmark:pytest_benchmark ninja:ninja matplotlib:matplotlib tqdm:tqdm numpy:numpy

.PHONY: install test bench gpu-check clean help

help:
	@echo "make test       install what is missing, run the test suite (CPU: Triton kernels in the interpreter)"
	@echo "make bench      install what is missing, run the decode benchmark (fastgpt vs Hugging Face generate)"
	@echo "make gpu-check  on a GPU machine: every CUDA test, sanitizers, all benchmarks -> \$$RESULTS_DIR"

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP_INSTALL) "$(CPU_TORCH)"
	@for dep in $(PY_DEPS); do \
	    pkg=$${dep%%:*}; mod=$${dep##*:}; \
	    $(PYTHON) -c "import $$mod" 2>/dev/null || $(PIP_INSTALL) "$$pkg" \
	        || echo "warning: could not install $$pkg (no network?); continuing without it"; \
	done
	@$(PYTHON) -m pip show -q fastgpt >/dev/null 2>&1 || \
	    $(PIP_INSTALL) --no-deps --no-build-isolation -e . \
	    || echo "warning: editable install failed; running from the source tree"

test: install
	PYTHONPATH=$(CURDIR) $(PYTHON) -m pytest tests -q -rs

bench: install
	PYTHONPATH=$(CURDIR) $(PYTHON) -m benchmarks.decode

gpu-check: install
	PYTHONPATH=$(CURDIR) $(PYTHON) -m benchmarks.gpu_check

clean:
	rm -rf build .pytest_cache .benchmarks *.egg-info
