"""The native kernel modules share one pool of worker threads (engine/cpu/native/workers.h).

Each module is its own shared object; with a pool apiece, a decode step woke one worker per
module (products, norms, attention), and their spinning took the core from each other."""

import os
import subprocess
import sys

import pytest

from engine.cpu import quant_linear

needs_kernels = pytest.mark.skipif(not quant_linear.available() or not os.path.isdir("/proc/self/task"),
                                   reason="quantized kernels not built (make native), or no /proc")

_GENERATE = """
import os, sys
sys.path.insert(0, "tests")
from engine import Engine, EngineConfig, SamplingParams
from tiny_quant_models import tiny_gguf_model
import engine.cpu as cpu
eng = Engine.load(tiny_gguf_model("gemma3_text"), EngineConfig(progress=False, drafter="none"))
eng.generate("Hello there", SamplingParams(max_tokens=6, temperature=0.0))
mods = [m for m in sys.modules if m.startswith("engine.cpu._")]
pool = [t for t in os.listdir("/proc/self/task") if open(f"/proc/self/task/{t}/comm").read().strip() == "kernelext-pool"]
print(len(pool), len(mods), type(cpu._kernel_workers).__name__)
eng.close()
"""


@needs_kernels
def test_one_pool_for_every_kernel_module():
    env = {**os.environ, "KERNELEXT_KERNEL_THREADS": "2"}  # one worker beside the caller
    run = subprocess.run([sys.executable, "-c", _GENERATE], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert run.returncode == 0, run.stderr
    out = run.stdout.split()
    workers, modules, holder = int(out[0]), int(out[1]), out[2]
    assert modules >= 3 and holder == "PyCapsule"  # products, norms and attention were loaded
    assert workers == 1
