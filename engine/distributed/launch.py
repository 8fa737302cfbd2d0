"""What EngineCore calls when the config names a hostfile: start the group before the
model loads (the load shards it across the group), then put the plan wrappers
around the model runner and the prefix cache once they exist."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import InvalidRequestError
from .group import DistributedGroup
from .hostfile import read_hostfile
from .plan import PlanPrefixCache, PlanRunner, SharedObjects
from .sharding import choose_layout, family


def start(model_path, config) -> DistributedGroup:
    """Check that the model can be split, then spawn the followers and form the MLX group."""
    from ..models.loader import load_mlx_lm

    if config.drafter == "mtp":
        raise InvalidRequestError("drafter='mtp' is not available with a hostfile (the draft "
                                  "head is not sharded); use 'ngram' or 'none'")
    model, model_config = load_mlx_lm(Path(model_path))  # lazy: nothing is read yet
    # A family that cannot be split fails here, before anything is spawned.
    layout = choose_layout(model, model_config, config.distributed_layout)
    del model
    setup = dict(model=str(Path(model_path).resolve()), dtype=config.dtype, layout=layout,
                 size=len(read_hostfile(config.hostfile).hosts), family=family(model_config))
    group = DistributedGroup.start(config.hostfile, setup, timeout=config.distributed_timeout)
    group.layout = layout
    return group


def attach(group: DistributedGroup, runner, prefix_cache, config):
    """The runner and prefix cache the step loop drives: broadcasting wrappers. The
    followers build their prefix caches with the same fingerprint and block size, each
    over its own SSD directory (<kv dir>/ranks/rank-N)."""
    group.wait_ready()
    objects = SharedObjects(group)
    if prefix_cache is not None:
        pc = prefix_cache
        ssd = None if pc.ssd is None else (config.cache_dir or "")
        objects.send("prefix_cache", pc.fingerprint, pc.block_size, pc.hot.budget_bytes, ssd,
                     config.ssd_cache_bytes)
        prefix_cache = PlanPrefixCache(pc, group, objects)
    return PlanRunner(runner, group, objects), prefix_cache


def cache_identity(fingerprint: str, group: DistributedGroup | None) -> str:
    if group is None:
        return fingerprint
    # A rank's blocks hold its part of the KV, not the whole model's.
    return hashlib.sha256(f"{fingerprint}|{group.layout}/{group.size}".encode()).hexdigest()
