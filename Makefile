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
# The project's own modules are byte-compiled here too, so the first run does not pay for it.
TORCH := $(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(BIN)/pip install -q torch torchvision
$(STAMP): pyproject.toml | $(BIN)/python
	$(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/python -m compileall -q zoo
	touch $(STAMP) $(DEMO_STAMP)

# `make demo` needs only the train and export extras (not dev's transformers, open_clip, wandb, pytest ...): less to
# install, and less written to disk that the first run would have to read back once the page cache has dropped it.
$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(TORCH)
	$(BIN)/pip install -q -e ".[train,export]"
	$(BIN)/python -m compileall -q zoo
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
