"""Processes measured from outside: wall time, peak RSS (from the kernel, via wait4), and
HTTP servers started as a user would, timed from spawn until they answer."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    peak_rss_mb: float  # the process's maximum resident set size


def _collect(stream, into: list) -> threading.Thread:
    t = threading.Thread(target=lambda: into.append(stream.read()), daemon=True)
    t.start()
    return t


def _reap(proc: subprocess.Popen) -> tuple[int, float]:
    """Wait for proc with wait4, which reports its peak RSS (Popen.wait would discard it)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024  # KiB on Linux


def run(cmd: list[str], env: dict | None = None, timeout: float = 3600) -> Finished:
    """Run cmd to completion; its output, wall time and peak RSS."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = [], []
    readers = [_collect(proc.stdout, out), _collect(proc.stderr, err)]
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        rc, rss = _reap(proc)
    finally:
        timer.cancel()
    for r in readers:
        r.join()
    return Finished(rc, "".join(out), "".join(err), time.perf_counter() - t0, rss)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """An HTTP server in its own process: base URL, seconds from spawn to first answer,
    and (after stop()) its peak RSS."""

    name: str
    proc: subprocess.Popen
    base: str
    ready_s: float = 0.0
    peak_rss_mb: float = 0.0
    log: list = field(default_factory=list)

    def stop(self) -> float:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            timer = threading.Timer(60, self.proc.kill)
            timer.start()
            try:
                _, self.peak_rss_mb = _reap(self.proc)
            finally:
                timer.cancel()
        return self.peak_rss_mb


def start_server(name: str, cmd: list[str], port: int, env: dict | None = None,
                 ready_path: str = "/v1/models", timeout: float = 900) -> Server:
    """Spawn cmd (which listens on 127.0.0.1:port) and wait until ready_path answers 200."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    server = Server(name, proc, f"http://127.0.0.1:{port}")
    _collect(proc.stderr, server.log)  # drained, so a chatty server never blocks on its pipe
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(server.base + ready_path, timeout=2) as r:
                if r.status == 200:
                    server.ready_s = time.perf_counter() - t0
                    return server
        except OSError:
            time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"{name} did not answer {ready_path} within {timeout:.0f} s")


def post(base: str, path: str, body: dict, timeout: float = 1800) -> dict:
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())
