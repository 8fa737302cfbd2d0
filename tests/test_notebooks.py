"""The notebooks in notebooks/ run top to bottom in a fresh kernel, as a reader runs them.

Each notebook is executed by notebooks/run_notebook.py (the script `make demo` uses) in a
kernel of its own, with the repository on PYTHONPATH and a temporary KV cache directory
(KERNELEXT_KV_CACHE) and tune file (KERNELEXT_TUNE_FILE), so CI never reads or writes the
user's state. Any cell error fails the test with that cell and its traceback. The executed
copies and their HTML go to artifacts/notebooks/ (git-ignored) for a look afterwards.

The notebooks use the default model (gemma-3-270m, converted once into the shared model
cache) and take about 2 minutes together on a 2-core CPU.
"""

import importlib.util
import json
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts" / "notebooks"
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").glob("*.ipynb")
                   if not p.name.endswith(".executed.ipynb"))
IGNORE = "# NBVAL_IGNORE_OUTPUT"


def _runner():
    spec = importlib.util.spec_from_file_location("run_notebook", ROOT / "notebooks" / "run_notebook.py")
    module = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)
    return module


def _text(output) -> str:
    if output.output_type == "stream":
        return output.text
    return output.get("data", {}).get("text/plain", "")


def test_the_three_tutorial_notebooks_exist():
    assert {p.stem for p in NOTEBOOKS} >= {"quickstart", "speculation", "prefix-cache"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_source_conventions(path):
    """Committed notebooks carry no outputs (CI and `make demo` produce them), and the
    nbval markers are where nbval looks for them."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        assert not cell.outputs and cell.execution_count is None, f"clear the outputs of {cell.source!r}"
        lines = cell.source.splitlines()
        assert IGNORE not in lines[1:], f"{IGNORE} must be the first line: {cell.source!r}"
        if lines and lines[0].startswith("%%"):  # a cell magic must come first: nbval's tag instead
            assert not any(line.startswith("# NBVAL") for line in lines), cell.source


@pytest.mark.timeout(900)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path):
    out = ARTIFACTS / f"{path.stem}.executed.ipynb"
    run = _runner().run(path, out, html=True, state_dir=tmp_path, timeout=600, raise_on_error=False)
    if run.error is not None:
        pytest.fail(f"{path.name} failed (executed copy: {out}):\n{run.error}", pytrace=False)
    assert run.html is not None and run.html.stat().st_size > 0
    code = [c for c in run.notebook.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    # Nothing a reader would take for a problem: no warnings or errors on stderr.
    stderr = [(c.source, o.text) for c in code for o in c.outputs
              if o.output_type == "stream" and o.name == "stderr"]
    assert not stderr, stderr
    # Streaming cells end with their complete text and the footer, however the stream was timed.
    for cell in code:
        if cell.source.startswith("%%generate"):
            final = _text(cell.outputs[-1]).rstrip()
            assert final.endswith((" · length", " · stop")), (cell.source, final)
    # The kernel's KV cache was the temporary one (every notebook but prefix-cache, which
    # makes its own, prefills something there), and tuning wrote the temporary tune file.
    if path.stem != "prefix-cache":
        assert list((tmp_path / "kv" / "blocks").glob("*.safetensors"))
    if path.stem == "speculation":
        tuned = json.loads((tmp_path / "tune.json").read_text())
        assert any(key.endswith("|ngram") for key in tuned)
