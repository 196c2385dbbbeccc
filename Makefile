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
# `--no-compile`: pip would byte-compile all ~6,000 modules of torch and its dependencies, most of which are never
# imported; instead the project's own modules are compiled, and a warm-up import compiles the ones a run actually uses.
PIP := $(BIN)/pip install -q --no-compile
TORCH := $(PIP) "torch==2.14.1" "torchvision==0.29.1" || $(PIP) torch torchvision
WARM := $(BIN)/python -m compileall -q zoo && $(BIN)/python -c "import torch.onnx, torchvision, timm, onnxruntime, zoo.demo, zoo.training, zoo.bench"
$(STAMP): pyproject.toml | $(BIN)/python
	$(TORCH)
	$(PIP) -e ".[dev]"
	$(WARM)
	touch $(STAMP) $(DEMO_STAMP)

# `make demo` needs only the train and export extras (not dev's transformers, open_clip, wandb, pytest ...): less to
# install, and less written to disk that the first run would have to read back once the page cache has dropped it.
$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(TORCH)
	$(PIP) -e ".[train,export]"
	$(WARM)
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
