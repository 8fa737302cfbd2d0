"""The notebooks run under nbval, cell by cell in one fresh kernel each:
`pytest --nbval-lax notebooks/` (part of `make test`).

Lax mode fails a notebook on any cell error; committed notebooks carry no outputs
(tests/test_notebooks.py), so there is nothing to compare, and `# NBVAL_IGNORE_OUTPUT`
marks the cells whose output changes from run to run (timings, rates) for anyone
who runs `pytest --nbval` against an executed copy. One check goes beyond nbval:
nothing on stderr (a warning is a problem to a reader). nbval does not apply
`update_display_data`, so a streaming `%%generate` cell's final text is not seen
here; tests/test_extension.py checks it through a real kernel.

The kernels inherit this process's environment: a temporary KV cache directory and
tune file, so a test run never reads or writes the user's caches, and the
repository on PYTHONPATH.
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
collect_ignore_glob = ["*.executed.ipynb"]  # `make demo`'s executed copies

_state = Path(tempfile.mkdtemp(prefix="kernelext-nbval-"))
atexit.register(shutil.rmtree, _state, ignore_errors=True)  # the cells' KV cache, ~40 MB a run
os.environ["KERNELEXT_KV_CACHE"] = str(_state / "kv")
os.environ["KERNELEXT_TUNE_FILE"] = str(_state / "tune.json")
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings from subprocess cells


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    result = yield
    outputs = getattr(item, "test_outputs", None)  # an nbval cell, after it ran
    if outputs is not None:
        stderr = "".join(o.text for o in outputs if o.output_type == "stream" and o.name == "stderr")
        if stderr:
            pytest.fail(f"the cell wrote to stderr:\n{item.cell.source}\n---\n{stderr}", pytrace=False)
    return result
