"""Rank 0's view of the group: starting the followers, sending them the plan, and
noticing when one of them dies or hangs.

A collective (the all_sum inside every sharded layer) blocks until every rank joins
it, so rank 0 cannot learn from MLX that a peer hung. Each follower therefore sends
a heartbeat over its plan connection, and a watchdog thread on rank 0 fails the
group when a follower closes its connection, reports an error, stops beating for
`timeout` seconds, or when one call of the plan has run for `timeout` seconds. To
fail, it kills the followers: their ring sockets close, so a collective that rank 0
is blocked in raises at once (MLX's ring backend fails pending work on a lost peer)
and the step loop fails the in-flight requests with the group's error. From then
on every call raises that error and the engine refuses new requests.

MLX keeps one group per process (`mx.distributed.init` returns it again), so a
process that lost its group cannot form another: restart the kernel or the server.
Each rank's SSD tier brings the prefixes back.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
import socket
import tempfile
import threading
import time
from pathlib import Path

from ..errors import DistributedGroupError, ModelLoadError
from .channel import Channel
from .hostfile import Cluster, group_environment, read_hostfile, spawn_follower, write_files

HEARTBEAT_S = 0.5  # a follower's heartbeat period (follower.py)
TOKEN_VARIABLE = "KERNELEXT_GROUP_TOKEN"  # in a follower's environment; its hello shows it
_group_formed = False  # this process already formed its one MLX group


class DistributedGroup:
    def __init__(self, cluster: Cluster, timeout: float):
        self.cluster, self.hosts, self.timeout = cluster, cluster.hosts, timeout
        self.size = len(cluster.hosts)
        self.layout = "tensor"  # set by launch.start: "tensor" or "pipeline" (sharding.py)
        self.error: DistributedGroupError | None = None
        self.mx_group = None
        self.processes: dict[int, object] = {}
        self.written: dict[str, str] = {}  # variable -> temp file the local ranks read
        self.logs: dict[int, Path] = {}
        self.channels: dict[int, Channel] = {}
        self.last_seen: dict[int, float] = {}
        self.ready: set[int] = set()  # followers that loaded their shard (heartbeats count from then)
        self._ready_event = threading.Event()
        self.step_since: float | None = None  # when the running call of the plan began
        self.closing = False
        self.token = secrets.token_hex(16)  # followers prove they were started by this group
        self._lock = threading.Lock()

    # -- start ----------------------------------------------------------------------
    @classmethod
    def start(cls, hostfile, setup: dict, timeout: float, connect_timeout: float = 120.0):
        """Spawn ranks 1..N-1, wait for their plan connections, send them `setup` (the
        model and load options), then form the MLX group with them (MLX thread)."""
        global _group_formed
        if _group_formed:
            raise DistributedGroupError(
                "this process already formed an MLX group (MLX keeps one per process); "
                "restart the kernel or the server to start a new group")
        cluster = read_hostfile(hostfile)
        hosts = cluster.hosts
        group = cls(cluster, timeout)
        env, files = group_environment(cluster)
        group.written = write_files(files)  # for the local ranks; removed when the group closes
        setup = {**setup, "backend": cluster.mlx_backend}
        listener = socket.create_server((hosts[0].ip, 0), family=socket.AF_INET6 if ":" in hosts[0].ip
                                        else socket.AF_INET)
        address = f"{hosts[0].ip}:{listener.getsockname()[1]}"
        try:
            for host in hosts[1:]:
                group.logs[host.rank] = Path(tempfile.mkstemp(prefix=f"kernelext-rank{host.rank}-",
                                                              suffix=".log")[1])
                group.processes[host.rank] = spawn_follower(
                    host, {**env, TOKEN_VARIABLE: group.token}, files, group.written, address,
                    group.logs[host.rank])
            group._accept(listener, connect_timeout)
            for rank, channel in group.channels.items():
                channel.send({"op": "setup", "args": [setup]})
            group._start_watchdog()
            _group_formed = True  # even if forming it fails: MLX may hold a half-made group
            group.mx_group = group._form(env, files, max(timeout, 10.0))
        except BaseException:
            group.close(graceful=False)
            raise
        finally:
            listener.close()
        return group

    def _form(self, env: dict, files: dict, timeout: float):
        """mx.distributed.init, which retries until every peer is there: on a helper
        thread, so a follower that died before joining fails the load (with its reason)
        instead of blocking this thread for ever. The helper is left blocked then."""
        box: dict = {}

        def run():
            try:
                box["group"] = _init(self.cluster.mlx_backend, env, files)
            except BaseException as e:
                box["error"] = e

        helper = threading.Thread(target=run, daemon=True, name="kernelext-group-init")
        helper.start()
        deadline = time.monotonic() + timeout
        while helper.is_alive() and self.error is None and time.monotonic() < deadline:
            helper.join(0.1)
        if "error" in box:
            raise box["error"]
        if "group" not in box:
            if self.error is None:
                self.fail(f"the group did not form within {timeout:.0f} s")
            raise ModelLoadError(str(self.error))
        return box["group"]

    def _accept(self, listener: socket.socket, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.channels) < self.size - 1:
            for rank, proc in self.processes.items():
                if proc.poll() is not None and rank not in self.channels:
                    raise ModelLoadError(f"rank {rank} ({self.hosts[rank].ssh}) exited with code "
                                         f"{proc.returncode} before joining:\n{self.log_tail(rank)}")
            listener.settimeout(max(0.1, min(1.0, deadline - time.monotonic())))
            try:
                sock, _ = listener.accept()
            except socket.timeout:
                if time.monotonic() > deadline:
                    missing = sorted(set(self.processes) - set(self.channels))
                    raise ModelLoadError(f"ranks {missing} did not connect within {timeout:.0f} s")
                continue
            channel = Channel(sock)
            rank = self._greet(channel)
            if rank is None:  # not one of ours: drop it, keep waiting
                channel.close()
                continue
            self.channels[rank] = channel
            self.last_seen[rank] = time.monotonic()

    def _greet(self, channel: Channel) -> int | None:
        """The rank a new plan connection says it is, if it shows this group's token
        (given to the followers in their environment) and the rank is still expected."""
        channel.sock.settimeout(10)
        try:
            hello = channel.recv()
            rank = int(hello["hello"])
        except (OSError, EOFError, ValueError, KeyError, TypeError):
            return None
        channel.sock.settimeout(None)
        if not hmac.compare_digest(str(hello.get("token", "")), self.token):
            return None
        return rank if rank in self.processes and rank not in self.channels else None

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Wait until every follower has loaded its shard (rank 0 loads its own meanwhile)."""
        deadline = time.monotonic() + timeout
        while not self._ready_event.wait(0.1):
            self.check()
            if time.monotonic() > deadline:
                self.fail(f"ranks {sorted(set(self.channels) - self.ready)} did not load the model "
                          f"within {timeout:.0f} s")
        self.check()

    # -- the plan -------------------------------------------------------------------
    def send(self, op: str, *args) -> None:
        """Tell every follower to run `op(*args)` next (raises once the group is down)."""
        self.check()
        try:
            for channel in self.channels.values():
                channel.send({"op": op, "args": list(args)})
        except OSError as e:
            self._fail_unless_told(f"sending the plan failed: {e}")
            raise self.error from e

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    @contextlib.contextmanager
    def step(self):
        """Around a call whose collectives all ranks run: under the watchdog's deadline;
        a ring error becomes the group's error."""
        self.step_since = time.monotonic()
        try:
            yield
        except RuntimeError as e:
            if self.error is None and not str(e).startswith(("[ring]", "[jaccl]")):
                raise
            self._fail_unless_told(f"MLX lost a peer ({e})")
            raise self.error from e
        finally:
            self.step_since = None
        self.check()  # failed while this call ran (its result may be garbage)

    def agree_min(self, n: int) -> int:
        """The smallest `n` over the ranks (each rank's prefix cache may hold fewer blocks)."""
        import mlx.core as mx

        with self.step():
            return int(mx.distributed.all_min(mx.array([n], dtype=mx.int32), group=self.mx_group).item())

    # -- faults -----------------------------------------------------------------------
    def _start_watchdog(self) -> None:
        for rank, channel in self.channels.items():
            threading.Thread(target=self._read, args=(rank, channel), daemon=True,
                             name=f"kernelext-rank{rank}").start()
        threading.Thread(target=self._watch, daemon=True, name="kernelext-watchdog").start()

    def _read(self, rank: int, channel: Channel) -> None:
        host = self.hosts[rank]
        while True:
            try:
                message = channel.recv()
            except (EOFError, OSError, ValueError):
                if not self.closing:
                    code = None
                    with contextlib.suppress(Exception):
                        code = self.processes[rank].wait(timeout=2)
                    how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited (code {code})"
                    self.fail(f"rank {rank} ({host.ssh}) {how}:\n{self.log_tail(rank)}")
                return
            self.last_seen[rank] = time.monotonic()
            if "ready" in message:
                self.ready.add(rank)
                if len(self.ready) == self.size - 1:
                    self._ready_event.set()
            if "error" in message:
                self.fail(f"rank {rank} ({host.ssh}) failed: {message['error']}")

    def _watch(self) -> None:
        while self.error is None and not self.closing:
            time.sleep(min(0.25, self.timeout / 4))
            now = time.monotonic()
            for rank, seen in list(self.last_seen.items()):
                # Before `ready` a follower is loading: a dead one is noticed by its
                # connection closing, a stuck one by wait_ready()'s deadline.
                if rank in self.ready and now - seen > self.timeout:
                    self.fail(f"rank {rank} ({self.hosts[rank].ssh}) sent no heartbeat for "
                              f"{now - seen:.1f} s (timeout {self.timeout:g} s)")
            since = self.step_since
            if since is not None and now - since > self.timeout:
                self.fail(f"one step of the group ran for {now - since:.1f} s (timeout {self.timeout:g} s)")

    def _fail_unless_told(self, reason: str) -> None:
        """A broken socket says only that a peer is gone; the plan connections say which
        one and why (a reader thread fails the group with the rank and its exit code), so
        give them a moment to tell before failing with the less precise `reason`."""
        deadline = time.monotonic() + 2.0
        while self.error is None and time.monotonic() < deadline:
            time.sleep(0.02)
        self.fail(reason)

    def fail(self, reason: str) -> None:
        """Mark the group down (first reason wins) and kill the followers, which
        unblocks any collective rank 0 is waiting in."""
        with self._lock:
            if self.error is not None or self.closing:
                return
            self.error = DistributedGroupError(
                f"the distributed group is down: {reason.rstrip()}\nIn-flight requests were failed and "
                "new ones are refused; restart the kernel (or server) to start the group again.")
        self._kill()

    def _kill(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.kill()

    def log_tail(self, rank: int, lines: int = 8) -> str:
        try:
            text = self.logs[rank].read_text(errors="replace").strip().splitlines()
        except (KeyError, OSError):
            return "(no log)"
        shown = "".join(f"  | {line}\n" for line in text[-lines:] if not line.startswith("[ring]"))
        return f"{shown}  (its output: {self.logs[rank]})"

    def close(self, graceful: bool = True) -> None:
        """Stop the followers: ask them to flush and exit, then kill what is left."""
        if graceful and self.error is None:
            with contextlib.suppress(OSError):
                for channel in self.channels.values():
                    channel.send({"op": "close", "args": []})
        self.closing = True
        deadline = time.monotonic() + (30 if graceful else 0)
        for proc in self.processes.values():
            with contextlib.suppress(Exception):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        self._kill()
        for proc in self.processes.values():
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
        for channel in self.channels.values():
            channel.close()
        for path in self.written.values():
            Path(path).unlink(missing_ok=True)
        if self.error is None:  # a failed group keeps its followers' output for diagnosis
            for log in self.logs.values():
                log.unlink(missing_ok=True)


def _init(backend: str, env: dict, files: dict):
    """Rank 0's group. MLX reads the rank and the group's description from the
    environment; they are set only for the call, so processes this one starts later
    do not inherit them."""
    import mlx.core as mx

    paths = write_files(files)
    wanted = {**env, **paths, "MLX_RANK": "0"}
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        return mx.distributed.init(backend=backend, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f"could not form the {backend} group: {e}") from e
    finally:
        for path in paths.values():
            Path(path).unlink(missing_ok=True)  # read by init
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
