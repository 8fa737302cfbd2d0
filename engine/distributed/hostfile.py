"""The hostfile and the follower processes it names.

The hostfile is mlx.launch's own JSON format (parsed by mlx's parser), e.g.

    [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}, {"ssh": "mac-b.local", "ips": ["10.0.0.2"]}]

Entry 0 is this process (rank 0: scheduler, server, notebook). For every other
entry, rank 0 starts a follower the way mlx.launch starts a ring rank: the same
environment variables (MLX_RANK, MLX_HOSTFILE holding the ring's "ip:port" lists),
locally for 127.0.0.1/localhost and over `ssh -tt` otherwise (the remote process
ends with the ssh session). mlx.launch itself cannot be used as is because it
starts every rank, rank 0 included, as a new process, and rank 0 must be the
process the user already has (the Jupyter kernel or `kernelext serve`).
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidRequestError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
RING_PORT = 32323  # mlx.launch's default --starting-port, for ranks on other machines


@dataclass
class Host:
    rank: int
    ssh: str
    ip: str

    @property
    def local(self) -> bool:
        return self.ssh in LOCAL_HOSTS


def read_hostfile(path: str | os.PathLike) -> list[Host]:
    from mlx._distributed_utils.common import Hostfile  # mlx.launch's parser

    try:
        parsed = Hostfile.from_file(path)
    except ValueError as e:
        raise InvalidRequestError(f"cannot read the hostfile: {e}") from e
    if parsed.backend not in ("", "ring"):
        raise InvalidRequestError(
            f"hostfile {path}: backend {parsed.backend!r} is not supported; kernelext runs "
            "MLX's ring backend (TCP, including Thunderbolt bridges)")
    if len(parsed.hosts) < 2:
        raise InvalidRequestError(f"hostfile {path} lists {len(parsed.hosts)} host(s); a group needs 2 or more")
    hosts = []
    for h in parsed.hosts:
        if not h.ips:
            raise InvalidRequestError(
                f"hostfile {path}: host {h.ssh_hostname!r} has no \"ips\"; the ring backend needs IP addresses")
        hosts.append(Host(h.rank, h.ssh_hostname, h.ips[0]))
    return hosts


def ring_hostfile(hosts: list[Host]) -> str:
    """MLX_HOSTFILE's content for the ring backend: one ["ip:port"] list per rank."""
    ports = [_free_port(h.ip) if h.local else RING_PORT + h.rank for h in hosts]
    return json.dumps([[f"{h.ip}:{p}"] for h, p in zip(hosts, ports)])


def _free_port(ip: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET) as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def spawn_follower(host: Host, ring: str, plan_address: str, log_path: Path) -> subprocess.Popen:
    """Start rank `host.rank`: `python -m engine.distributed.follower` with the ring's
    environment, its output in `log_path`."""
    command = [sys.executable, "-m", "engine.distributed.follower", "--plan", plan_address,
               "--rank", str(host.rank)]
    log = open(log_path, "wb")
    if host.local:
        ring_file = Path(tempfile.mkstemp(prefix="kernelext-ring-", suffix=".json")[1])
        ring_file.write_text(ring)
        env = dict(os.environ, MLX_RANK=str(host.rank), MLX_HOSTFILE=str(ring_file))
        return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    # As mlx.launch does: the same interpreter path and working directory on the remote host.
    script = (f"cd {shlex.quote(os.getcwd())} 2>/dev/null; export MLX_RANK={host.rank}; "
              f"f=$(mktemp); echo {shlex.quote(ring)} > $f; export MLX_HOSTFILE=$f; "
              f"exec {shlex.join(command)}")
    return subprocess.Popen(["ssh", "-tt", "-o", "LogLevel=QUIET", host.ssh, script],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
