import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import tempfile  # noqa: E402

# Tests never touch the user's KV cache; each test that cares passes its own cache_dir.
os.environ["KERNELEXT_KV_CACHE"] = tempfile.mkdtemp(prefix="kernelext-kv-tests-")
os.environ["KERNELEXT_TUNE_FILE"] = os.path.join(tempfile.mkdtemp(prefix="kernelext-tune-"), "tune.json")

import engine  # noqa: E402,F401  (loads the fast BLAS before anything imports mlx)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
