"""The hostfile and the follower processes it names.

The hostfile is mlx.launch's own JSON format (parsed by mlx's parser), e.g.

    [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}, {"ssh": "mac-b.local", "ips": ["10.0.0.2"]}]

Entry 0 is this process (rank 0: scheduler, server, notebook). For every other
entry, rank 0 starts a follower the way mlx.launch starts a rank: the same
environment variables (MLX_RANK; for the ring MLX_HOSTFILE, a file of the ring's
"ip:port" lists; for JACCL MLX_JACCL_COORDINATOR and MLX_IBV_DEVICES; the hostfile's
"envs"), locally for 127.0.0.1/localhost and over `ssh -tt` otherwise (the remote
process ends with the ssh session). mlx.launch itself cannot be used as is because it
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
RING_PORT = 32323  # mlx.launch's default --starting-port (ring ranks on other machines, JACCL's coordinator)
BACKENDS = ("ring", "jaccl", "jaccl-ring")


@dataclass
class Host:
    rank: int
    ssh: str
    ip: str
    rdma: list  # JACCL: this rank's RDMA device per peer (None for itself)

    @property
    def local(self) -> bool:
        return self.ssh in LOCAL_HOSTS


@dataclass
class Cluster:
    hosts: list[Host]
    backend: str  # one of BACKENDS
    envs: list[str]  # the hostfile's "envs" ("NAME=value"), set on every rank

    @property
    def mlx_backend(self) -> str:
        return "ring" if self.backend == "ring" else "jaccl"


def read_hostfile(path: str | os.PathLike) -> Cluster:
    from mlx._distributed_utils.common import Hostfile  # mlx.launch's parser

    try:
        parsed = Hostfile.from_file(path)
    except ValueError as e:
        raise InvalidRequestError(f"cannot read the hostfile: {e}") from e
    backend = parsed.backend or "ring"
    if backend not in BACKENDS:
        raise InvalidRequestError(
            f"hostfile {path}: backend {backend!r} is not supported; kernelext runs MLX's ring "
            "backend (TCP, Thunderbolt bridges included) and JACCL (RDMA over Thunderbolt)")
    n = len(parsed.hosts)
    if n < 2:
        raise InvalidRequestError(f"hostfile {path} lists {n} host(s); a group needs 2 or more")
    hosts = []
    for h in parsed.hosts:
        if not h.ips:
            raise InvalidRequestError(
                f"hostfile {path}: host {h.ssh_hostname!r} has no \"ips\"; MLX's backends need IP addresses")
        if backend != "ring" and (len(h.rdma) != n or h.rdma[h.rank] is not None):
            raise InvalidRequestError(
                f"hostfile {path}: host {h.ssh_hostname!r} needs \"rdma\" with one entry per host, "
                "null for itself (mlx.distributed_config --backend jaccl writes it)")
        hosts.append(Host(h.rank, h.ssh_hostname, h.ips[0], list(h.rdma)))
    return Cluster(hosts, backend, list(parsed.envs))


def group_environment(cluster: Cluster) -> tuple[dict[str, str], dict[str, str]]:
    """What every rank's MLX reads to form the group, as mlx.launch sets it: variables,
    and variables that name a file holding the given content. MLX_RANK comes on top."""
    env = dict(e.split("=", 1) for e in cluster.envs if "=" in e)
    if cluster.backend == "ring":
        ports = [_free_port(h.ip) if h.local else RING_PORT + h.rank for h in cluster.hosts]
        ring = [[f"{h.ip}:{p}"] for h, p in zip(cluster.hosts, ports)]
        return env, {"MLX_HOSTFILE": json.dumps(ring)}
    env["MLX_JACCL_COORDINATOR"] = f"{cluster.hosts[0].ip}:{RING_PORT}"
    if cluster.backend == "jaccl-ring":
        env["MLX_JACCL_RING"] = "1"
    return env, {"MLX_IBV_DEVICES": json.dumps([h.rdma for h in cluster.hosts])}


def _free_port(ip: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET) as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def write_files(files: dict[str, str]) -> dict[str, str]:
    """Each content in a temp file (kernelext-group-*); the variables naming them."""
    out = {}
    for name, content in files.items():
        fd, path = tempfile.mkstemp(prefix="kernelext-group-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(content)
        out[name] = path
    return out


def spawn_follower(host: Host, env: dict[str, str], files: dict[str, str], written: dict[str, str],
                   plan_address: str, log_path: Path) -> subprocess.Popen:
    """Start rank `host.rank`: `python -m engine.distributed.follower` with the group's
    environment, its output in `log_path`. A local rank reads the files rank 0 `written`
    (write_files(files)); a remote one gets them written on its host."""
    command = [sys.executable, "-m", "engine.distributed.follower", "--plan", plan_address,
               "--rank", str(host.rank)]
    log = open(log_path, "wb")
    rank_env = {**env, "MLX_RANK": str(host.rank)}
    if host.local:
        rank_env.update(written)
        return subprocess.Popen(command, env={**os.environ, **rank_env}, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    # As mlx.launch does: the same interpreter path and working directory on the remote
    # host, the files written there with mktemp.
    script = f"cd {shlex.quote(os.getcwd())} 2>/dev/null; "
    script += "".join(f"export {k}={shlex.quote(v)}; " for k, v in rank_env.items())
    for name, content in files.items():
        script += f"f=$(mktemp); echo {shlex.quote(content)} > $f; export {name}=$f; "
    script += f"exec {shlex.join(command)}"
    return subprocess.Popen(["ssh", "-tt", "-o", "LogLevel=QUIET", host.ssh, script],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def add_arguments(parser, rank0: str) -> None:
    """--hostfile and --layout, as `kernelext serve` and `%llm load` take them; rank0 names
    the process that becomes rank 0 ("this process", "this kernel")."""
    parser.add_argument("--hostfile", metavar="FILE",
                        help="split the model across the processes/Macs of this mlx.launch hostfile "
                             f"({rank0} is rank 0 and starts the others)")
    parser.add_argument("--layout", choices=("auto", "tensor", "pipeline"), default="auto",
                        help="with --hostfile: how the model is split (default: tensor where the "
                             "family has it, else pipeline)")
