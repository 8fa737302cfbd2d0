"""A follower rank: `python -m engine.distributed.follower --plan HOST:PORT --rank N`.

Started by rank 0 (hostfile.py) with the ring's environment. It connects to rank 0's
plan channel, forms the ring group, loads its shard of the model, then replays every
call rank 0 sends, in order, on its own ModelRunner and PrefixCache (plan.py names
them). It samples nothing and decides nothing: its logits are computed only because
the forward's collectives need every rank. A heartbeat thread tells rank 0 it is
alive; any error in a replayed call is reported and ends the process (its state
would no longer match rank 0's). The plan connection closing ends it too.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

from .channel import Channel
from .group import HEARTBEAT_S, TOKEN_VARIABLE


def _heartbeat(channel: Channel) -> None:
    while True:
        try:
            channel.send({"hb": time.time()})
        except OSError:
            os._exit(1)  # rank 0 is gone
        time.sleep(HEARTBEAT_S)


class Follower:
    def __init__(self, rank: int, setup: dict):
        import engine  # noqa: F401  (picks the BLAS before MLX loads: engine/cpu/backend.py)
        import mlx.core as mx

        from ..core.model_runner import ModelRunner
        from ..models import loader

        self.mx, self.rank = mx, rank
        self.group = mx.distributed.init(backend=setup["backend"], strict=True)
        if self.group.rank() != rank or self.group.size() != setup["size"]:
            raise RuntimeError(f"ring says rank {self.group.rank()}/{self.group.size()}, "
                               f"rank 0 says {rank}/{setup['size']}")
        loaded = loader.load(Path(setup["model"]), setup["dtype"], group=self.group,
                             layout=setup["layout"])
        self.runner = ModelRunner(loaded.model)
        self.cache = None
        self.objects: dict[int, object] = {}  # rank 0's ids -> this rank's caches and block payloads

    # -- the calls rank 0 sends (plan.py), by name ---------------------------------------
    def prefix_cache(self, fingerprint, block_size, hot_bytes, ssd_dir, ssd_bytes):
        from ..cache.prefix_cache import PrefixCache
        from ..config import default_kv_cache_dir

        if ssd_dir is not None:
            # rank 0's directory if it was given explicitly, else this host's default
            base = Path(ssd_dir) if ssd_dir else default_kv_cache_dir()
            ssd_dir = base / "ranks" / f"rank-{self.rank}"
        self.cache = PrefixCache(self.runner.new_cache(), fingerprint, block_size, hot_bytes,
                                 ssd_dir, ssd_bytes)

    def drop(self, ids):
        for i in ids:
            self.objects.pop(i, None)

    def new_cache(self, cid):
        self.objects[cid] = self.runner.new_cache()

    def prefill(self, cid, tokens, next_tokens):
        self.runner.prefill(self.objects[cid], tokens, next_tokens)

    def add_rows(self, cids):
        self.runner.add_rows([self.objects[c] for c in cids])

    def keep_rows(self, rows):
        self.runner.keep_rows(rows)

    def reset(self):
        self.runner.reset()

    def decode(self, tokens):
        self.mx.eval(self.runner.decode(tokens))

    def verify(self, windows):
        self.runner.verify(windows)

    def commit(self, keep, window):
        self.runner.commit(keep, window)

    def abort(self):
        self.runner.abort()

    def lookup(self, keys, count, first):
        mx = self.mx
        found = self.cache.lookup(keys, count=count)
        n = int(mx.distributed.all_min(mx.array([len(found)], dtype=mx.int32), group=self.group).item())
        for i, payload in enumerate(found[:n]):
            self.objects[first + i] = payload

    def restore(self, cid, payload_ids):
        self.objects[cid] = self.cache.restore([self.objects[i] for i in payload_ids])

    def publish(self, pid, key, cid, back=0):
        self.objects[pid] = self.cache.publish(key, self.objects[cid], back)

    def set_budgets(self, hot_bytes, ssd_bytes):
        self.cache.set_budgets(hot_bytes, ssd_bytes)

    def clear(self):
        self.cache.clear()

    def close(self):
        if self.cache is not None:
            self.cache.close()  # flushes queued SSD writes

    CALLS = ("prefix_cache", "drop", "new_cache", "prefill", "add_rows", "keep_rows", "reset",
             "decode", "verify", "commit", "abort", "lookup", "restore", "publish",
             "set_budgets", "clear")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", required=True, metavar="HOST:PORT")
    parser.add_argument("--rank", type=int, required=True)
    args = parser.parse_args(argv)
    host, _, port = args.plan.rpartition(":")
    channel = Channel(socket.create_connection((host.strip("[]"), int(port)), timeout=60))
    channel.sock.settimeout(None)
    channel.send({"hello": args.rank, "pid": os.getpid(), "token": os.environ.pop(TOKEN_VARIABLE, "")})
    threading.Thread(target=_heartbeat, args=(channel,), daemon=True).start()
    follower = None
    while True:
        try:
            message = channel.recv()
        except (EOFError, OSError):
            message = {"op": "close", "args": []}  # rank 0 is gone: flush and leave
        op, call_args = message["op"], message["args"]
        try:
            if op == "setup":
                follower = Follower(args.rank, *call_args)
                channel.send({"ready": True})
            elif op == "close":
                if follower is not None:
                    follower.close()
                return 0
            elif op in Follower.CALLS:
                getattr(follower, op)(*call_args)
            else:
                raise ValueError(f"unknown call {op!r}")
        except Exception as e:
            traceback.print_exc()
            try:
                channel.send({"error": f"{op}: {type(e).__name__}: {e}"})
            except OSError:
                pass
            sys.stdout.flush()
            return 1


if __name__ == "__main__":
    sys.exit(main())
