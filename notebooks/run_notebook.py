"""Run a notebook top to bottom, headless, the way CI and `make demo` do.

    .venv/bin/python notebooks/run_notebook.py notebooks/quickstart.ipynb [--html]
        [--out PATH] [--timeout SECONDS] [--user-state]

Writes the executed copy next to the notebook as NAME.executed.ipynb (and
NAME.html with --html; both are git-ignored) and prints where they are and how
long each notebook and its slowest cells took. A cell error stops the run and
exits with status 1; the executed copy is still written, up to the failing cell.

The kernel is this Python (the `python3` kernelspec resolves to sys.executable),
started in the notebook's directory with the repository on PYTHONPATH. Unless
--user-state is given it also gets a fresh temporary KV cache directory
(KERNELEXT_KV_CACHE) and speculation tune file (KERNELEXT_TUNE_FILE), so a run
never reads or writes the user's caches and always starts cold. Converted
models (~/.cache/kernelext/models) are shared: a conversion is slow and always
gives the same files.

Needs nbclient (and nbconvert for --html): `pip install -e ".[test]"`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    notebook: object  # the executed nbformat.NotebookNode
    executed: Path
    html: Path | None
    seconds: float
    error: BaseException | None = None
    cell_seconds: list[tuple[int, float, str]] = field(default_factory=list)  # (index, s, first line)


def kernel_env(state_dir: str | os.PathLike | None) -> dict[str, str]:
    """The kernel's environment: the repo importable and, given state_dir, caches kept in it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings from subprocess cells
    if state_dir is not None:
        env["KERNELEXT_KV_CACHE"] = str(Path(state_dir) / "kv")
        env["KERNELEXT_TUNE_FILE"] = str(Path(state_dir) / "tune.json")
    return env


def executed_path(path: Path) -> Path:
    return path.with_name(path.stem + ".executed.ipynb")


def coalesce_streams(nb) -> None:
    """Merge consecutive stream outputs of a cell, as Jupyter's own frontends save them:
    a streamed reply (`%%generate --plain`) arrives as many small stdout messages."""
    for cell in nb.cells:
        merged = []
        for out in cell.get("outputs", []):
            last = merged[-1] if merged else None
            if (last is not None and out.output_type == "stream" == last.output_type
                    and out.name == last.name):
                last.text += out.text
            else:
                merged.append(out)
        if cell.cell_type == "code":
            cell.outputs = merged


def _cell_seconds(nb) -> list[tuple[int, float, str]]:
    """Per code cell, from the timestamps nbclient records (record_timing)."""
    out = []
    for i, cell in enumerate(nb.cells):
        timing = cell.get("metadata", {}).get("execution", {})
        start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
        if cell.cell_type == "code" and start and end:
            seconds = (datetime.fromisoformat(end.replace("Z", "+00:00"))
                       - datetime.fromisoformat(start.replace("Z", "+00:00"))).total_seconds()
            first = next((line for line in cell.source.splitlines()
                          if line.strip() and not line.startswith("# NBVAL")), "")
            out.append((i, seconds, first[:60]))
    return out


def run(path: str | os.PathLike, out: str | os.PathLike | None = None, *, html: bool = False,
        timeout: int = 600, state_dir: str | os.PathLike | None = None,
        user_state: bool = False, raise_on_error: bool = True) -> Run:
    """Execute the notebook at `path` and write the executed copy (and HTML).

    state_dir: where the kernel's KV cache and tune file go (default: a fresh temporary
    directory, removed afterwards); user_state=True leaves the user's own in place.
    """
    import nbformat
    from nbclient import NotebookClient

    path = Path(path).resolve()
    out = Path(out).resolve() if out else executed_path(path)
    nb = nbformat.read(path, as_version=4)
    temp = None
    if not user_state and state_dir is None:
        state_dir = temp = tempfile.mkdtemp(prefix="kernelext-notebook-")
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    error = None
    try:
        client.execute(env=kernel_env(None if user_state else state_dir))
    except Exception as e:  # CellExecutionError, a timeout, a dead kernel
        error = e
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    seconds = time.perf_counter() - start
    coalesce_streams(nb)
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    html_path = None
    if html:
        from nbconvert import HTMLExporter

        body, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
        html_path = out.with_name(out.name.removesuffix(".executed.ipynb").removesuffix(".ipynb") + ".html")
        html_path.write_text(body, encoding="utf-8")
    result = Run(nb, out, html_path, seconds, error, _cell_seconds(nb))
    if error is not None and raise_on_error:
        raise error
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run_notebook.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="the executed copy (one notebook only)")
    parser.add_argument("--html", action="store_true", help="also write NAME.html")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell (default 600)")
    parser.add_argument("--user-state", action="store_true",
                        help="use the user's KV cache and tune file instead of temporary ones")
    args = parser.parse_args(argv)
    if args.out and len(args.notebooks) > 1:
        parser.error("--out takes one notebook")
    failed = 0
    for path in args.notebooks:
        print(f"running {path} ...", flush=True)
        r = run(path, args.out, html=args.html, timeout=args.timeout, user_state=args.user_state,
                raise_on_error=False)
        slowest = sorted(r.cell_seconds, key=lambda c: -c[1])[:3]
        print(f"  {'FAILED' if r.error else 'ok'} in {r.seconds:.0f} s; slowest cells: "
              + "; ".join(f"[{i}] {s:.0f} s {line!r}" for i, s, line in slowest))
        print(f"  executed notebook: {r.executed}")
        if r.html:
            print(f"  HTML:              {r.html}")
        if r.error:
            failed += 1
            print(f"\n{r.error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
