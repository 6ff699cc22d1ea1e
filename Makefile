# Every target creates and uses the project's virtual environment (.venv) itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-requirements

.PHONY: setup test train eval convert export bench plan clean-venv

# The pinned requirements, then this project itself, editable (tools/ and experiments/ are read
# from the checkout); `pip check` holds pyproject.toml's dependencies to the pins.
$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

setup: $(STAMP)

# PYTEST_ARGS="-k parity" narrows the run. Tests marked `solo` (the reduced demo) run after the
# others, alone on the machine, so that their run time is their own (a `-m` in PYTEST_ARGS would
# replace this split: narrow with -k). Both runs happen even if the first fails; "no tests
# selected" (pytest's status 5) fails only when neither run selected any.
test: $(STAMP)
	@a=0; b=0; \
	$(BIN)/python -m pytest -q -n 2 --durations=10 -m "not solo" $(PYTEST_ARGS) tests || a=$$?; \
	$(BIN)/python -m pytest -q --durations=3 -m solo $(PYTEST_ARGS) tests || b=$$?; \
	[ $$a -eq 5 ] && [ $$b -eq 5 ] && exit 5; \
	[ $$a -eq 0 ] || [ $$a -eq 5 ] || exit $$a; \
	[ $$b -eq 0 ] || [ $$b -eq 5 ] || exit $$b

# Command-line variables other than EXP/MODEL/ARGS are passed on as overrides:
#   make train EXP=gsm8k_llama train.updates=2 rollout.num_samples=4
OVERRIDES = $(foreach v,$(.VARIABLES),$(if $(filter command line,$(origin $(v))),$(if $(filter EXP MODEL ARGS SRC OUT CKPT PYTEST_ARGS,$(v)),,$(v)=$($(v)))))

train: $(STAMP)
	$(BIN)/python tools/train.py $(EXP) $(OVERRIDES)

# make eval MODEL=<checkpoint, run step or HF dir> ARGS="--task gsm8k --split test" (a run step: its own task;
# data.field=value settings change it, e.g. a custom task's data.path=my_qa.jsonl)
eval: $(STAMP)
	$(BIN)/python tools/eval.py $(MODEL) $(ARGS) $(OVERRIDES)

# make convert SRC=<HF dir or hub id> OUT=<checkpoint dir> [ARGS="--param-dtype bfloat16"]
convert: $(STAMP)
	$(BIN)/python tools/convert_hf.py $(SRC) $(OUT) $(ARGS)

# make export CKPT=<checkpoint dir> OUT=<HF dir> [ARGS="--dtype bfloat16"]
export: $(STAMP)
	$(BIN)/python tools/export_hf.py $(CKPT) $(OUT) $(ARGS)

# Sampler, scorer and train-step throughput beside transformers on the same weights.
# ARGS="--config llama8b" on a GPU (ARGS="--config llama8b --parts train" for the 8B train step on 80 GB).
bench: $(STAMP)
	$(BIN)/python tools/bench.py $(ARGS)

# Per-device memory of an experiment's compiled programs on a mesh, from abstract shapes (no weights):
#   make plan EXP=gsm8k_llama ARGS="--mesh 1,8,1 --device-memory 80GB"   (ARGS="--lora 16" for LoRA)
plan: $(STAMP)
	$(BIN)/python tools/plan.py $(or $(EXP),gsm8k_llama) $(ARGS) $(OVERRIDES)

clean-venv:
	rm -rf $(VENV)
