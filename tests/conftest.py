import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# Everything a run writes lives in one directory that is removed when it ends: the
# KV cache and tune file (tests never touch the user's), pytest's tmp_path dirs, and
# whatever the engine, servers, kernels and followers put in the temp dir (TMPDIR is
# inherited). A suite that leaves ~1 GB in /tmp per run fills a CI disk.
_session_dir = Path(tempfile.mkdtemp(prefix="kernelext-tests-"))
atexit.register(shutil.rmtree, _session_dir, ignore_errors=True)
(_session_dir / "tmp").mkdir()
tempfile.tempdir = os.environ["TMPDIR"] = str(_session_dir / "tmp")
os.environ["KERNELEXT_KV_CACHE"] = str(_session_dir / "kv")
os.environ["KERNELEXT_TUNE_FILE"] = str(_session_dir / "tune.json")

import engine  # noqa: E402,F401  (loads the fast BLAS before anything imports mlx)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
