# Two commands on a fresh machine: `make demo` and `make test`. Both install what is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
DEMO_DIR ?= demo
comma := ,
space := $(subst ,, )

.PHONY: install test test-all demo study study-data study-full study-check readme-tables bench gpu-check clean

install: $(STAMP)

# Re-installs only when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q --upgrade pip
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]'
	$(PY) -c "import torch, torchvision, facenet_pytorch, timm, webdataset, av, librosa, h5py; print('installed: torch', torch.__version__)"
	touch $@

# On every core (pytest-xdist): the tests of a file that share a fixture of their own stay on one
# worker, Ray's on one too (tests/conftest.py); `PYTEST_ARGS=-n0` runs them in this process.
PYTEST_ARGS ?= -n auto
test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The fast suite, then the slow one (end-to-end matrices: every method under torchrun, every
# method through evaluate, the synthetic calibration). CI runs this.
test-all: test
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

# The main job end to end, in under 5 minutes on 2 cores: the study's imbalanced corpus with 5 of
# its 8 sentences (the voice shows the emotion on most clips, the face on fewer, independently per
# clip; 18 actors, because the face generalises across actors only from about ten training actors
# on - with 12 actors the visual-only control stayed near chance), its manifest, shards of one
# actor-disjoint fold (frames, audio; the face stages are left out to stay quick - the tests run
# them), an HDF5 export, then joint training and MLB over 5 seeds (enough for a paired 95 % CI:
# the demo's headline, MLB against joint, is clear of it; docs/calibration.md), and the report,
# which opens with that verdict and ends with a short table. A re-run does no new work.
DEMO_SYNTH := --actors 18 --sentences 5 --audio-signal 1.0 --audio-clear 0.85 --video-signal 0.5 --video-clear 0.6
demo: install
	$(PY) cli.py synth cremad --out $(DEMO_DIR)/corpus $(DEMO_SYNTH)
	$(PY) cli.py manifest cremad --root $(DEMO_DIR)/corpus --out $(DEMO_DIR)/manifest
	$(PY) cli.py preprocess cremad --root $(DEMO_DIR)/corpus --out $(DEMO_DIR)/pre --split kfold1 \
		--stages frames,audio,pack --workers 2
	$(PY) cli.py export h5 --shards $(DEMO_DIR)/pre/shards/kfold1 --out $(DEMO_DIR)/kfold1.h5
	$(PY) cli.py sweep --config experiments/sweeps/synthetic_small.yaml --out $(DEMO_DIR)/runs \
		--shards '$(DEMO_DIR)/pre/shards/{split}' --jobs 2
	$(PY) cli.py report --runs $(DEMO_DIR)/runs --out $(DEMO_DIR)/report

# Controlled-imbalance study (docs/study.md; its result in the README): two calibrated synthetic
# settings (docs/calibration.md), each its own corpus and shards of one actor-disjoint fold:
# - imbalanced: the voice shows the emotion on 85 % of clips, the face on 60 % and more faintly;
# - complementary: each on 60 %, the face more faintly (cue 1.0 against the voice's 1.3); either
#   modality alone misses many clips the other gets.
# Each clip's clarity is drawn independently per modality. experiments/sweeps/study.yaml trains the
# unimodal controls, joint training and every balancing method x 5 seeds on both; `make study`
# runs the subset STUDY_METHODS x STUDY_SEEDS (under 30 minutes on 2 cores), `make study-full` all
# of it (the runs `make study` finished are kept). Then the report with the imbalance figure; `make
# readme-tables` copies its summary to docs/results/study/ and regenerates the README's tables.
STUDY_DIR ?= study
STUDY_SYNTH_imbalanced := --actors 18 --sentences 8 --audio-signal 1.0 --audio-clear 0.85 --video-signal 0.5 --video-clear 0.6
STUDY_SYNTH_complementary := --actors 18 --sentences 8 --audio-signal 1.3 --audio-clear 0.6 --video-signal 1.0 --video-clear 0.6
STUDY_METHODS := audio_only visual_only joint mlb mmpareto ogm_ge
STUDY_SEEDS := 0 1 2
STUDY_SWEEP = $(PY) cli.py sweep --config experiments/sweeps/study.yaml --shards '$(STUDY_DIR)/{block}/pre/shards/{split}'
# One setting's corpus, manifest and shards (kfold1): `make study-data-imbalanced`.
study-data-%: install
	@test -n "$(STUDY_SYNTH_$*)" || { echo "error: no study setting '$*' (imbalanced, complementary)" >&2; exit 2; }
	$(PY) cli.py synth cremad --out $(STUDY_DIR)/$*/corpus $(STUDY_SYNTH_$*)
	$(PY) cli.py manifest cremad --root $(STUDY_DIR)/$*/corpus --out $(STUDY_DIR)/$*/manifest
	$(PY) cli.py preprocess cremad --root $(STUDY_DIR)/$*/corpus --out $(STUDY_DIR)/$*/pre --split kfold1 \
		--stages frames,audio,pack --workers 2
study-data: study-data-imbalanced study-data-complementary
study: study-data
	$(STUDY_SWEEP) --out $(STUDY_DIR)/runs --jobs 2 \
		--only '$(subst $(space),$(comma),$(foreach m,$(STUDY_METHODS),*/$(m)-*/*-s[$(subst $(space),,$(STUDY_SEEDS))]))'
	$(PY) cli.py report --runs $(STUDY_DIR)/runs --out $(STUDY_DIR)/report
study-full: study-data
	$(STUDY_SWEEP) --out $(STUDY_DIR)/runs --jobs 2
	$(PY) cli.py report --runs $(STUDY_DIR)/runs --out $(STUDY_DIR)/report

# Reproducibility of the committed summary: one run of it (STUDY_CHECK_RUN, a run id of
# docs/results/study/summary.json) re-run from scratch in $(STUDY_DIR)/check with the study's
# command and one thread (as the study's runs, two at a time on two cores), then every number
# of it compared with the summary's (`report --check`; exit 2 when one differs).
STUDY_CHECK_RUN ?= imbalanced/mlb-late_linear/kfold1-s0
study-check: study-data-$(firstword $(subst /, ,$(STUDY_CHECK_RUN)))
	rm -rf $(STUDY_DIR)/check
	OMP_NUM_THREADS=1 $(STUDY_SWEEP) --out $(STUDY_DIR)/check --only '$(STUDY_CHECK_RUN)'
	$(PY) cli.py report --summary docs/results/study/summary.json --check $(STUDY_DIR)/check

# The README's result tables are generated: copy a finished study's summary into docs/results/
# and rewrite every marked README block from the committed summaries.
readme-tables: install
	@if [ -f $(STUDY_DIR)/report/summary.json ]; then mkdir -p docs/results/study && cp $(STUDY_DIR)/report/summary.json docs/results/study/summary.json; fi
	@if [ -f $(DEMO_DIR)/report/summary.json ]; then mkdir -p docs/results/demo && cp $(DEMO_DIR)/report/summary.json docs/results/demo/summary.json; fi
	$(PY) -m experiments.tables README.md

# Benchmarks: ratios against baselines measured in the same run (docs/benchmarks.md).
bench: install
	$(PY) bench/preprocess.py --json bench/preprocess.json
	$(PY) bench/train.py --json bench/train.json
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --nproc_per_node 2 bench/ddp_step.py --json bench/ddp_step.json

# Every CUDA path measured in one command, on the first GPU a task is lent (sized for <= 8 minutes, unmeasured; its own
# small synthetic corpus included): throughput with and without the loader, bf16 vs fp32,
# train.compile, nvJPEG, the face stages on CUDA, a 1-process NCCL torchrun. Writes bench/gpu.json
# and renders it into docs/benchmarks.md ("GPU check"). Smoke mode on a CPU (the fast suite runs
# it): `python bench/gpu_check.py --device cpu --tiny --out /tmp/gpu.json`.
gpu-check: install
	$(PY) bench/gpu_check.py --device cuda --out bench/gpu.json
	$(PY) bench/tables.py docs/benchmarks.md

clean:
	rm -rf $(DEMO_DIR) $(STUDY_DIR) .pytest_cache
