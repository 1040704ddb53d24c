# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch first and pinned: these wheels are local on our machines; an unpinned torch is a multi-GB download.
TORCH := torch==2.14.1 torchvision==0.29.1
DEMO_SHARDS := shards/synth-demo
LAUNCH_CPU := launch_configs/cpu_2proc.yaml

.PHONY: demo test setup clean-demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	# DeepSpeed (ZeRO launch configs) builds against the torch above: no build isolation, or pip fetches another torch
	$(PY) -m pip install --quiet --no-build-isolation 'deepspeed>=0.14'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/aol shards synth --out $(DEMO_SHARDS) --train 3000 --validate 0 --test 1000 --image-size 64 --samples-per-shard 250
	$(VENV)/bin/aol shards inspect $(DEMO_SHARDS)
	run=demo-$$(date -u +%Y%m%d-%H%M%S) && \
	OMP_NUM_THREADS=1 $(VENV)/bin/accelerate launch --config_file $(LAUNCH_CPU) -m aol_dist.train \
	  --config configs/demo.toml data.shards=$(DEMO_SHARDS) train.run_name=$$run && \
	OMP_NUM_THREADS=1 $(VENV)/bin/aol audit runs/$$run --split train

test: setup
	$(PY) -m pytest -q

clean-demo:
	rm -rf $(DEMO_SHARDS) runs/demo-*
