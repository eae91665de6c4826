# Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

DEMO_DIR ?= runs/demo

# Test workers (pytest-xdist). Two keep a 2-core machine busy: much of the
# suite is process start-up, compilation and gloo waits.
JOBS ?= 2
PYTEST := $(PY) -m pytest -q -n $(JOBS)
# The tests whose tolerances are claims about floating point, re-run on
# ATen's portable kernels so that a tolerance fitted to one CPU's kernels
# (AVX-512, AMX) fails here first.
NUMERICS := ATEN_CPU_CAPABILITY=default $(PYTEST) -m numerics tests
# On x86-64, once more on AVX2 kernels (ATen, MKL, oneDNN), the older CPUs' path.
ifeq ($(shell uname -m),x86_64)
NUMERICS += && ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 $(PYTEST) -m numerics tests
endif

.PHONY: install demo test test-fast test-numerics test-gpu bench upcycle-experiment report-check clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The torch pins live in the set-up path only; the package metadata stays permissive.
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[test,tensorboard,timm,hf,onnx,serve,contrastive]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m vmoe_torch.cli.main demo --workdir $(DEMO_DIR)

# The whole suite, as CI runs it: lint, types, every test, then the
# numerically sensitive ones again on the portable kernels (and on AVX2 ones).
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy src
	$(PYTEST) tests
	$(NUMERICS)

# The edit loop: everything but the slow, distributed and reliability groups (< 90 s).
test-fast: $(STAMP)
	$(PYTEST) -m "not slow and not distributed and not reliability" tests

test-numerics: $(STAMP)
	$(NUMERICS)

# On a machine with a CUDA device: the GPU checks and the GPU benchmark.
test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu tests/gpu
	$(PY) benchmarks/gpu_moe.py

bench: $(STAMP)
	$(PY) benchmarks/moe_layer.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/expert_parallel.py
	$(PY) benchmarks/convert_checkpoint.py

# The demo's report.html in headless Chromium (after make demo): no console
# error, nothing fetched, hover works; screenshots to docs/img. Installs
# Debian's chromium when missing (needs root).
report-check: $(STAMP)
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)
	$(PY) -m vmoe_torch.cli.main analyze $(DEMO_DIR)/moe/final --data configs/demo_moe.yaml --out $(DEMO_DIR)/analysis
	VMOE_REPORT=$(DEMO_DIR)/analysis/report.html VMOE_SCREENSHOTS=docs/img \
		$(PY) -m pytest -q -p no:cacheprovider tests/analysis/test_report_browser.py

# Dense vs upcycled continuation on the bundled digits (docs/results.md); ~6 min.
upcycle-experiment: $(STAMP)
	$(PY) experiments/upcycle_digits.py --out runs/upcycle

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
