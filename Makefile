# Fresh machine: `make demo` or `make test`. Both create .venv if needed and install the project into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install bench model-card clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch/torchvision first, pinned to the wheels that lie on this machine's disk; the project's own ranges admit them.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(BIN)/pip install -q torch torchvision
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
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
