"""One model across several processes or Macs (mx.distributed: ring, or JACCL).

    launch.py    what EngineCore calls with a hostfile: start the group, wrap the runner
    hostfile.py  mlx.launch's hostfile; starting ranks 1..N-1 as mlx.launch would
    group.py     rank 0's view of the group: the plan's sending side, heartbeats, faults
    channel.py   the plan's side channel (JSON lines over TCP)
    plan.py      rank 0's broadcasting ModelRunner and PrefixCache
    follower.py  ranks 1..N-1: replay the plan on their own shard and caches
    sharding.py  mlx-lm's tensor (shard) or pipeline layout, or a clear error naming the family

Rank 0 (the kernel, or `kernelext serve`) runs the ordinary engine; the step loop is
the same with or without a group. EngineCore calls launch.start/attach only when
EngineConfig.hostfile is set, and then drives plan.py's wrappers instead of the
ModelRunner and PrefixCache.
"""
