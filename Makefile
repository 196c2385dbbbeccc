# Fresh machine: `make demo` or `make test`. Both create .venv if needed and install the project into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo

.PHONY: demo test install bench model-card clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch/torchvision first, pinned to the wheels that lie on this machine's disk; the project's own ranges admit them.
TORCH = $(BIN)/pip install -q $(1) "torch==2.14.1" "torchvision==0.29.1" || $(BIN)/pip install -q $(1) torch torchvision
$(STAMP): pyproject.toml | $(BIN)/python
	$(call TORCH,)
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/python -m compileall -q zoo
	touch $(STAMP) $(DEMO_STAMP)

# `make demo` needs only the train and export extras (not dev's transformers, open_clip, wandb, pytest ...), and skips
# pip's byte-compilation of all ~6,000 modules of torch and its dependencies: a warm-up import compiles only the ones
# the demo uses (with bytecode writing on even where PYTHONDONTWRITEBYTECODE is set, as on this machine), so the
# first run is as fast as the second.
$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(call TORCH,--no-compile)
	$(BIN)/pip install -q --no-compile -e ".[train,export]"
	$(BIN)/python -m compileall -q zoo
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -c "import torch.onnx, torch.export, torchvision, timm, onnx, \
	    onnxscript, onnxruntime, lightning.pytorch, torchmetrics, sklearn, matplotlib, zoo.demo, zoo.training, zoo.bench"
	touch $(DEMO_STAMP)

install: $(STAMP)

demo: $(if $(wildcard $(STAMP)),$(STAMP),$(DEMO_STAMP))
	$(BIN)/python -m zoo.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --durations=15

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_nextvit.py

model-card: $(STAMP)
	$(BIN)/python scripts/make_model_card.py
	$(BIN)/python scripts/make_readme_table.py

clean:
	rm -rf $(VENV) runs artifacts
