# weightsmith developer targets. Each one creates .venv and installs the package if needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-slow demo bench bench-merge bench-fold bench-pleas bench-rps clean

$(STAMP): pyproject.toml setup.py weightsmith/merge/native/_kernels.c weightsmith/merge/native/_tie_replay.h
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "torch==2.13.0"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

demo: $(STAMP)
	$(BIN)/python -m weightsmith.demo

# Benchmarks print figures side by side with their reference; they take minutes, never run in CI.
bench: $(STAMP)
	$(BIN)/python bench/io_floor.py
	$(BIN)/python bench/analyze_cost.py

bench-merge: $(STAMP)
	$(BIN)/python bench/merge_vs_mergekit.py --params 220M
	$(BIN)/python bench/merge_quality.py

bench-fold: $(STAMP)
	$(BIN)/python bench/fold_quality.py

bench-pleas: $(STAMP)
	$(BIN)/python bench/pleas_quality.py --arch mlp resnet --seeds 3 --lm

bench-rps: $(STAMP)
	$(BIN)/python bench/rps_quality.py --scratch-steps 500

clean:
	rm -rf $(VENV) demo-out
