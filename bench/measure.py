"""Processes measured from outside: wall time, peak RSS (from the kernel, via wait4), and
HTTP servers started as a user would, timed from spawn until they answer."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
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


# Peak RSS comes from wait4's ru_maxrss, taken by a small launcher process: Linux carries
# the RSS high-water mark of the memory a process had before exec() into ru_maxrss, so a
# child forked straight from this (large) bench process would report this process's size.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
signal_through = lambda *_: os.kill(pid, 15)
import signal
signal.signal(signal.SIGTERM, signal_through)
while True:
    try:
        _, status, usage = os.wait4(pid, 0)
        break
    except InterruptedError:
        continue
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""


def launched(cmd: list[str], rss_file: str) -> list[str]:
    """cmd run under the launcher, which writes the peak RSS (KiB) to rss_file at its end."""
    return [sys.executable, "-S", "-c", _LAUNCHER, rss_file, *cmd]


def _read_kib(path: str) -> float:
    try:
        with open(path) as f:
            return int(f.read()) / 1024
    except (OSError, ValueError):
        return float("nan")


def run(cmd: list[str], env: dict | None = None, timeout: float = 3600) -> Finished:
    """Run cmd to completion; its output, wall time and peak RSS."""
    with tempfile.NamedTemporaryFile(prefix="kernelext-rss-") as rss:
        t0 = time.perf_counter()
        proc = subprocess.Popen(launched(cmd, rss.name), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the command it runs
            out, err = proc.communicate()
            err += f"\n(killed after {timeout:.0f} s)"
        wall = time.perf_counter() - t0
        return Finished(proc.returncode, out, err, wall, _read_kib(rss.name))


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

    rss_file: str = ""

    def stop(self) -> float:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.peak_rss_mb = _read_kib(self.rss_file)
            os.unlink(self.rss_file)
        return self.peak_rss_mb


def start_server(name: str, cmd: list[str], port: int, env: dict | None = None,
                 ready_path: str = "/v1/models", timeout: float = 900) -> Server:
    """Spawn cmd (which listens on 127.0.0.1:port) and wait until ready_path answers 200."""
    rss_file = tempfile.mkstemp(prefix="kernelext-rss-")[1]
    t0 = time.perf_counter()
    proc = subprocess.Popen(launched(cmd, rss_file), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    server = Server(name, proc, f"http://127.0.0.1:{port}", rss_file=rss_file)
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
