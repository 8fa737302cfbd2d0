# Two entry points on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-py test bench install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	@# The widget test drives JupyterLab in Debian's Chromium (browser downloads are blocked).
	@test -x /usr/bin/chromium || ! command -v apt-get >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
	touch $(STAMP)

install: $(STAMP)

# Loads the default model and prints completions with their statistics, then runs
# notebooks/quickstart.ipynb headless (temporary KV cache and tune file) and writes the
# executed notebook and its HTML (git-ignored); it prints where they are.
demo: $(STAMP)
	$(PY) -m kernelext.demo
	$(PY) notebooks/run_notebook.py notebooks/quickstart.ipynb --html

# Only the first part, without Jupyter.
demo-py: $(STAMP)
	$(PY) -m kernelext.demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
