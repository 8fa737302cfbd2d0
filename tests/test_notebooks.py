"""The notebooks' source conventions. The notebooks themselves are executed by nbval
(`pytest --nbval-lax notebooks/`, in `make test`; see notebooks/conftest.py).
"""

from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").glob("*.ipynb")
                   if not p.name.endswith(".executed.ipynb"))
IGNORE = "# NBVAL_IGNORE_OUTPUT"


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
