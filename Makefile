# Two commands on a fresh machine:  make demo   and   make test
# Both create .venv on first use (idempotent: re-running skips what is done).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.llmtier-installed
# CPU build of torch, installed first so no dependency pulls CUDA wheels.
TORCH  ?= torch==2.13.0

.PHONY: venv demo test test-min bench clean

$(STAMP): pyproject.toml setup.py src/llmtier/engine/_uring.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[bench,hf,test]"
	$(BIN)/python -c "from llmtier.engine import available_engines as a; print('llmtier engines:', {k: v or 'ok' for k, v in a().items()})"
	touch $(STAMP)

venv: $(STAMP)

# The main job on built-in defaults: a ~180 MiB random-weight model at 60% of its weights, weights and KV on
# SSD, a prefix cache hit, traced; the HTML report lands in $(DEMO_DIR)/report/index.html.
DEMO_DIR ?= demo-out
demo: venv
	$(BIN)/llmtier demo --dir $(DEMO_DIR)

test: venv
	$(BIN)/python -m pytest -q -n auto

# The suite against the lowest versions pyproject.toml declares (pinned in constraints-min.txt), in .venv-min.
MIN := .venv-min
$(MIN)/.llmtier-installed: pyproject.toml setup.py constraints-min.txt
	test -x $(MIN)/bin/python || $(PYTHON) -m venv $(MIN)
	$(MIN)/bin/python -m pip install -q --upgrade pip setuptools wheel
	$(MIN)/bin/python -m pip install -q -c constraints-min.txt torch
	$(MIN)/bin/python -m pip install -q -c constraints-min.txt -e ".[bench,hf,test]"
	touch $@

test-min: $(MIN)/.llmtier-installed
	$(MIN)/bin/python -m pip list --format=freeze | grep -iE '^(torch|transformers|tokenizers|numpy|accelerate)=='
	$(MIN)/bin/python -m pytest -q -n auto

bench: venv
	$(BIN)/llmtier bench io --json bench-io.json --plot bench-io.png

clean:
	rm -rf $(VENV) $(MIN) $(DEMO_DIR) build src/*.egg-info src/llmtier/engine/*.so
