# Every target that needs Python runs `setup` first, so `make train` and `make test` each work
# as a single command on a fresh machine.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# The torch pair installed on these machines; override for another CUDA stack:
#   make setup TORCH_PINS="torch==2.5.1 torchvision==0.20.1"
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.distvae-installed

SYNTH_DIR ?= data/synth
SYNTH_N ?= 6000
SHARDS_DIR ?= shards/synth
TRAIN_ARGS ?=

.PHONY: setup test test-fast lint train bench gpu-check clean

setup: $(STAMP)

# Reinstalled whenever pyproject.toml or this Makefile changes (a stale venv is rebuilt in place).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[test]' $(TORCH_PINS)
	touch $@

lint: setup
	$(VENV)/bin/ruff check .

test: setup lint
	$(VENV)/bin/pytest

test-fast: setup lint
	$(VENV)/bin/pytest -m 'not slow'

$(SYNTH_DIR)/list_eval_partition.txt: | $(STAMP)
	$(VENV)/bin/distvae synth --out $(SYNTH_DIR) --n $(SYNTH_N)

$(SHARDS_DIR)/manifest.json: $(SYNTH_DIR)/list_eval_partition.txt
	$(VENV)/bin/distvae pack --src $(SYNTH_DIR) --out $(SHARDS_DIR) --name synth --shard-size 500

RUN_DIR ?= runs/tiny

train: setup $(SHARDS_DIR)/manifest.json
	$(VENV)/bin/distvae train --config tiny run.dir=$(RUN_DIR) \
		data.train_shards=$(SHARDS_DIR)/manifest.json data.val_shards=$(SHARDS_DIR)/manifest.json $(TRAIN_ARGS)

# Every bench side by side (data, step, resume, e2e; about 14 minutes on 2 cores), rewriting the measured
# section of BENCHMARKS.md. `make bench PEERS=1` adds mosaicml-streaming and litdata, installed in a venv of
# their own ($(PEERS_VENV)): they pin numpy below 2.2 and an old huggingface_hub, which break the test venv.
PEERS ?=
PEERS_VENV ?= .venv-peers
BENCH_PY := $(if $(PEERS),$(PEERS_VENV),$(VENV))
bench: setup
	$(if $(PEERS),test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV))
	$(if $(PEERS),$(PEERS_VENV)/bin/python -m pip install --quiet $(TORCH_PINS))
	$(if $(PEERS),$(PEERS_VENV)/bin/python -m pip install --quiet -e '.[bench]' $(TORCH_PINS))
	$(BENCH_PY)/bin/distvae bench all $(if $(PEERS),--peers) --json bench.json

# The GPU tests and the step benchmarks on this machine's CUDA device (about 5 minutes on one GPU); one line
# and nothing else without a GPU. A machine with its own CUDA torch: make gpu-check NO_SETUP=1 PY=python3
NO_SETUP ?=
GPU_CHECK_OUT ?= gpu-check
gpu-check: $(if $(NO_SETUP),,setup)
	$(PY) -m distvae.bench.gpucheck --out $(GPU_CHECK_OUT)

clean:
	rm -rf runs wandb $(SYNTH_DIR) $(SHARDS_DIR)
