# Two commands on a fresh machine: `make demo` and `make test`. Both install what is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
DEMO_DIR ?= demo

.PHONY: install test test-all demo clean

install: $(STAMP)

# Re-installs only when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q --upgrade pip
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]'
	$(PY) -c "import torch, torchvision, facenet_pytorch, timm, webdataset, av, librosa, h5py; print('installed: torch', torch.__version__)"
	touch $@

test: install
	$(PY) -m pytest -q

# Includes the slow end-to-end tests.
test-all: install
	$(PY) -m pytest -q -m ''

demo: install
	$(PY) cli.py synth cremad --out $(DEMO_DIR)/corpus
	$(PY) cli.py manifest cremad --root $(DEMO_DIR)/corpus --out $(DEMO_DIR)/manifest
	@echo "demo: corpus in $(DEMO_DIR)/corpus, manifest in $(DEMO_DIR)/manifest/summary.json"

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
