"""Engine-wide settings."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidRequestError

# EngineConfig.kv_dtype's values (the notebook's trait and the server's flag offer these)
KV_DTYPES = ("auto", "float32")


@dataclass
class EngineConfig:
    # Most requests decoded together in one forward pass.
    max_batch: int = 16
    # Requests allowed to wait for a batch slot; beyond this, submit() raises QueueFullError.
    max_waiting: int = 256
    # Tokens one engine step may process: one per decoding row, the rest goes to
    # prompt chunks, so a long prompt is prefilled in slices between decode steps.
    step_token_budget: int = 512
    # "auto": float32 weights on the CPU backend (bf16/quantized CPU kernels are
    # several times slower there), the checkpoint's own dtype on a GPU.
    dtype: str = "auto"
    # The KV cache's type where the quantized CPU kernels run (with their exact attention):
    # "auto" stores float16, as llama.cpp does, half the memory of the float32 activations
    # (the attention widens each element exactly, so batching, chunking and cache hits keep
    # a row's bits); "float32" keeps the activations' type. Elsewhere the KV cache has the
    # activations' type either way.
    kv_dtype: str = "auto"
    # Where converted models (GGUF -> mlx-lm directory) are kept; None = default.
    model_cache_dir: str | None = None
    # Longest prompt + completion; None = the model's max_position_embeddings.
    max_context: int | None = None
    # Show tqdm progress bars while converting/loading.
    progress: bool = True
    # Prefix KV cache. Prompts are cut into blocks of `block_size` tokens, and the
    # state after each block is the same computed or restored: a chunk-invariant model
    # (the quantized CPU path: every row computed from itself alone, models/loader.py)
    # prefills up to the step budget per forward and cuts its blocks from the result;
    # any other model computes one whole block per forward (float products depend on the
    # row count). 32: an agent's next turn recomputes only the conversation's last
    # partial block and its new message (98% of prompt tokens reused in
    # bench_prefix_cache.py's agent session, 96.7% at 64); on the per-block path the
    # cost is a slower cold prefill (more, smaller forwards: 2,048 tokens of Gemma 3 270M
    # took 5.65 s at 32 against 4.53 s at 128, best of 4, before its quantized path became
    # chunk-invariant).
    prefix_cache: bool = True
    block_size: int = 32
    hot_cache_bytes: int = 1 << 30  # RAM tier budget
    ssd_cache: bool = True
    ssd_cache_bytes: int = 8 << 30  # SSD tier budget, over every file in cache_dir
    # Also cache each finished request's reply (cache/reply_fill.py): an agent that
    # sends it back in its next prompt gets a hit on it.
    cache_replies: bool = True
    cache_dir: str | None = None  # None = $KERNELEXT_KV_CACHE or ~/.cache/kernelext/kv
    # Speculative decoding. "mtp": the model's own Multi-Token-Prediction head
    # (native or trained); "ngram": prompt lookup; "none": plain decoding;
    # "auto": "mtp" when the checkpoint has native MTP heads, else "ngram". Trained heads
    # (next to the model or bundled) are used with drafter="mtp".
    drafter: str = "auto"
    # Draft tokens per verify: an int (0 = off) or "auto" (adaptive per row from
    # measured acceptance and measured step cost).
    depth: int | str = "auto"
    max_depth: int = 8  # the most "auto" ever drafts (long n-gram matches in code edits pay at 8)
    # A trained draft head file for models without native MTP weights (None = look
    # next to the model and in the bundled heads).
    mtp_head: str | None = None
    # Embedding and reranking models (engine/embed): texts per forward, and padded
    # tokens per forward while no generation core shares the thread (with one, a
    # step holds to step_token_budget).
    embed_batch: int = 32
    embed_batch_tokens: int = 8192
    # One model across several processes or Macs (engine/distributed): an mlx.launch
    # hostfile; this process is rank 0 and starts the others. A rank that sends no
    # heartbeat, or a step that runs, for `distributed_timeout` seconds fails the group.
    hostfile: str | None = None
    distributed_timeout: float = 30.0
    # How the model is split: "tensor" (mlx-lm's shard), "pipeline" (layers per rank)
    # or "auto" (tensor where the family has it, else pipeline).
    distributed_layout: str = "auto"

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise InvalidRequestError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_waiting < 0:
            raise InvalidRequestError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.block_size < 16:
            raise InvalidRequestError(f"block_size must be >= 16, got {self.block_size}")
        if self.step_token_budget < self.max_batch + self.block_size:
            raise InvalidRequestError(
                f"step_token_budget ({self.step_token_budget}) must be at least max_batch "
                f"({self.max_batch}) + block_size ({self.block_size}) so prompts always make progress"
            )
        check_speculation(self.drafter, self.depth, self.max_depth)
        if self.embed_batch < 1 or self.embed_batch_tokens < 1:
            raise InvalidRequestError("embed_batch and embed_batch_tokens must be >= 1")
        for name in ("hot_cache_bytes", "ssd_cache_bytes"):
            if getattr(self, name) < 0:
                raise InvalidRequestError(f"{name} must be >= 0")
        if self.distributed_layout not in ("auto", "tensor", "pipeline"):
            raise InvalidRequestError(
                f"distributed_layout must be auto, tensor or pipeline; got {self.distributed_layout!r}")
        if not self.distributed_timeout >= 2:  # followers beat every 0.5 s (distributed/group.py)
            raise InvalidRequestError(f"distributed_timeout must be >= 2 seconds, got {self.distributed_timeout!r}")
        if self.hostfile is not None and not Path(self.hostfile).is_file():
            raise InvalidRequestError(f"hostfile {self.hostfile} does not exist")
        if self.kv_dtype not in KV_DTYPES:
            raise InvalidRequestError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}; got {self.kv_dtype!r}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16", "model"):
            raise InvalidRequestError(
                f"dtype must be one of auto, float32, float16, bfloat16, model; got {self.dtype!r}"
            )


def default_kv_cache_dir() -> Path:
    return Path(os.environ.get("KERNELEXT_KV_CACHE") or Path.home() / ".cache" / "kernelext" / "kv")


DRAFTERS = ("auto", "mtp", "ngram", "none")


def check_speculation(drafter, depth, max_depth=16) -> None:
    if drafter not in DRAFTERS:
        raise InvalidRequestError(f"drafter must be one of {', '.join(DRAFTERS)}; got {drafter!r}")
    if not (depth == "auto" or (isinstance(depth, int) and not isinstance(depth, bool)
                                and 0 <= depth <= 16)):
        raise InvalidRequestError(f"depth must be 'auto' or an integer in [0, 16]; got {depth!r}")
    if not (isinstance(max_depth, int) and 1 <= max_depth <= 16):
        raise InvalidRequestError(f"max_depth must be an integer in [1, 16]; got {max_depth!r}")
