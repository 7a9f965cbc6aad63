# Two commands on a fresh machine: `make demo` and `make test`. Both install what is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
DEMO_DIR ?= demo

.PHONY: install test test-all demo bench clean

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

# The synthetic corpus has no real face-feature weights: the demo uses a seeded random
# EfficientNet-B2 (recorded in shards.json) and 2 face frames per second to stay quick.
demo: install
	$(PY) cli.py synth cremad --out $(DEMO_DIR)/corpus
	$(PY) cli.py manifest cremad --root $(DEMO_DIR)/corpus --out $(DEMO_DIR)/manifest
	$(PY) cli.py preprocess cremad --root $(DEMO_DIR)/corpus --out $(DEMO_DIR)/pre --split kfold1,ogm \
		--workers 2 --face-fps 2 --allow-random-weights
	$(PY) cli.py export h5 --shards $(DEMO_DIR)/pre/shards/kfold1 --out $(DEMO_DIR)/kfold1.h5
	rm -rf $(DEMO_DIR)/runs/resnet_mlb
	$(PY) cli.py train --config trainer/configs/resnet_mlb.yaml --shards $(DEMO_DIR)/pre/shards/kfold1 \
		--out $(DEMO_DIR)/runs/resnet_mlb --set train.epochs=6 --set data.image_size=64 --set data.batch_size=8 \
		--set model.encoders.audio.width=16 --set model.encoders.visual.width=16
	$(PY) cli.py evaluate --run $(DEMO_DIR)/runs/resnet_mlb --split test
	@echo "demo: shards in $(DEMO_DIR)/pre/shards/kfold1, run in $(DEMO_DIR)/runs/resnet_mlb (metrics.jsonl, eval_test.json)"

# Benchmarks: ratios against baselines measured in the same run (docs/benchmarks.md).
bench: install
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev,bench]'
	$(PY) bench/preprocess.py --json bench/preprocess.json
	$(PY) bench/train.py --json bench/train.json

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
