"""Start `mlx_lm.server` on 127.0.0.1 as the baseline the benches compare against."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


@contextlib.contextmanager
def mlx_lm_server(model_dir: Path, preload: str | None, *extra_args: str):
    """Yields the base URL of a running mlx_lm.server; `preload` is a BLAS to LD_PRELOAD
    (None = the stock wheel, as a user would start it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, KERNELEXT_BLAS="none")
    if preload:
        env["LD_PRELOAD"] = preload
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_lm", "server", "--model", str(model_dir), "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "ERROR", *extra_args],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(base + "/v1/models", timeout=1).read()
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("mlx_lm.server did not start")
        yield base
    finally:
        proc.terminate()
        proc.wait(30)


def post(base: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=1800).read())
