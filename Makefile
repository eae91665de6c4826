# Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

DEMO_DIR ?= runs/demo

.PHONY: install demo test bench upcycle-experiment clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The torch pins live in the set-up path only; the package metadata stays permissive.
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[test,tensorboard,timm,hf,onnx]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m vmoe_torch.cli.main demo --workdir $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy src
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/moe_layer.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/expert_parallel.py
	$(PY) benchmarks/convert_checkpoint.py

# Dense vs upcycled continuation on the bundled digits (docs/results.md); ~6 min.
upcycle-experiment: $(STAMP)
	$(PY) experiments/upcycle_digits.py --out runs/upcycle

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
