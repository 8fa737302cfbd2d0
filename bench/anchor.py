"""llama.cpp, the CPU anchor the benches compare against, built from PyPI's sources.

    .venv/bin/python bench/anchor.py            # build (or reuse) and print the binaries' folder

The sources are those vendored in PyPI's `llama-cpp-python` sdist (`vendor/llama.cpp`),
fetched with pip itself (`pip download --no-binary :all: --no-deps llama-cpp-python`), so
the anchor needs nothing but PyPI. Everything lands in build/llama.cpp (git-ignored): the
sdist, its unpacked tree, cmake-build/ and anchor-build.log. A finished build is reused as is; an
unfinished one is continued by cmake (incrementally). Never commit llama.cpp's code.

Layout (shared with any earlier build made by hand the same way):
    build/llama.cpp/llama_cpp_python-<version>.tar.gz
    build/llama.cpp/llama_cpp_python-<version>/vendor/llama.cpp
    build/llama.cpp/cmake-build/bin/{llama-bench, llama-server, ...}
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ANCHOR_DIR = Path(os.environ.get("KERNELEXT_LLAMA_CPP_DIR") or ROOT / "build" / "llama.cpp")
# The four the benches need, plus llama-batched-bench for aggregate decode at 8 streams.
TARGETS = ("llama-bench", "llama-server", "llama-perplexity", "llama-quantize", "llama-batched-bench")


class AnchorUnavailable(RuntimeError):
    """llama.cpp could not be fetched or built; the message says where to look."""


@dataclass
class LlamaCpp:
    bin_dir: Path
    version: str  # the llama-cpp-python sdist it came from

    def tool(self, name: str) -> Path:
        path = self.bin_dir / name
        if not path.is_file():
            raise AnchorUnavailable(f"{path} was not built (see {ANCHOR_DIR / 'anchor-build.log'})")
        return path

    def has(self, name: str) -> bool:
        return (self.bin_dir / name).is_file()

    def env(self) -> dict:
        """Environment to run the binaries with: its shared libraries first on the path."""
        lib = str(self.bin_dir)
        return dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(
            p for p in (lib, os.environ.get("LD_LIBRARY_PATH")) if p))


def ensure_llama_cpp(targets=TARGETS, log=print) -> LlamaCpp:
    """The built anchor: reuses what is there, builds what is missing. Raises
    AnchorUnavailable naming the failing step and its log."""
    ANCHOR_DIR.mkdir(parents=True, exist_ok=True)
    build = ANCHOR_DIR / "cmake-build"
    bin_dir = build / "bin"
    # One builder at a time: two cmake runs in one tree corrupt each other.
    with open(ANCHOR_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        source = _source_tree(log)
        missing = [t for t in targets if not (bin_dir / t).is_file()]
        if missing:
            _build(source, build, missing, log)
    found = LlamaCpp(bin_dir, source.parent.parent.name.removeprefix("llama_cpp_python-"))
    absent = [t for t in targets if not found.has(t)]
    if absent:
        raise AnchorUnavailable(f"llama.cpp built, but {', '.join(absent)} missing in {bin_dir}")
    return found


def _source_tree(log) -> Path:
    """vendor/llama.cpp of the newest llama-cpp-python sdist in ANCHOR_DIR, downloaded if none."""
    trees = sorted(ANCHOR_DIR.glob("llama_cpp_python-*/vendor/llama.cpp/CMakeLists.txt"))
    if trees:
        return trees[-1].parent
    sdists = sorted(ANCHOR_DIR.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        log("downloading the llama-cpp-python sdist from PyPI (its vendor/llama.cpp is the anchor)")
        _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
              "-d", str(ANCHOR_DIR), "llama-cpp-python"],
             ANCHOR_DIR / "download.log", "pip download llama-cpp-python")
        sdists = sorted(ANCHOR_DIR.glob("llama_cpp_python-*.tar.gz"))
        if not sdists:
            raise AnchorUnavailable(f"pip downloaded no llama-cpp-python sdist into {ANCHOR_DIR}")
    log(f"unpacking {sdists[-1].name}")
    with tarfile.open(sdists[-1]) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name + "/"]
        tar.extractall(ANCHOR_DIR, members=members, filter="data")
    trees = sorted(ANCHOR_DIR.glob("llama_cpp_python-*/vendor/llama.cpp/CMakeLists.txt"))
    if not trees:
        raise AnchorUnavailable(f"{sdists[-1]} holds no vendor/llama.cpp")
    return trees[-1].parent


def _build(source: Path, build: Path, targets: list[str], log) -> None:
    cmake = _cmake()
    logfile = ANCHOR_DIR / "anchor-build.log"
    if not (build / "CMakeCache.txt").is_file():
        log(f"configuring llama.cpp ({source}) -> {build}")
        _run([cmake, "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
              "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF"],
             logfile, "cmake configure")
    log(f"building {', '.join(targets)} (several minutes on 2 cores; log: {logfile})")
    _run([cmake, "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", *targets],
         logfile, "cmake --build", append=True)


def _cmake() -> str:
    venv_cmake = Path(sys.executable).parent / "cmake"
    if venv_cmake.is_file():
        return str(venv_cmake)
    return "cmake"


def _run(cmd: list[str], logfile: Path, what: str, append: bool = False) -> None:
    with open(logfile, "a" if append else "w") as out:
        try:
            rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
        except OSError as e:
            raise AnchorUnavailable(f"{what} could not run: {e}") from e
    if rc != 0:
        tail = logfile.read_text(errors="replace").splitlines()[-15:]
        raise AnchorUnavailable(f"{what} failed (exit {rc}); last lines of {logfile}:\n" + "\n".join(tail))


if __name__ == "__main__":
    try:
        anchor = ensure_llama_cpp()
    except AnchorUnavailable as e:
        print(f"llama.cpp anchor unavailable: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"llama.cpp from llama-cpp-python {anchor.version}: {anchor.bin_dir}")
