"""Split one model's weights across the ranks of a group, with mlx-lm's own sharding.

mlx-lm models that support tensor parallelism carry `shard(group)`: attention heads
and MLP columns are split, and each block's output projection sums the partial
results across ranks (`all_sum`). That is the only layout the engine runs: every
rank then holds the same number of KV heads per layer, so a request's cache has the
same shape on every rank and the prefix cache's handlers work unchanged.
"""

from __future__ import annotations

from ..errors import UnsupportedModelError


def family(config: dict) -> str:
    text = config.get("text_config") or {}
    return config.get("model_type") or text.get("model_type") or "unknown"


def shard_support(model, config: dict) -> None:
    """Raise UnsupportedModelError, naming the family, unless mlx-lm can shard `model`."""
    name = family(config)
    if hasattr(model, "shard"):
        return
    if hasattr(getattr(model, "model", None), "pipeline"):
        # mlx-lm's pipeline() keeps None placeholders for other ranks' layers, so the
        # per-layer cache lists (and the prefix cache's handlers) would not line up.
        raise UnsupportedModelError(
            f"model family {name!r} only supports pipeline parallelism in mlx-lm, which "
            "kernelext does not run yet; families with tensor parallelism (shard) work")
    raise UnsupportedModelError(
        f"model family {name!r} has neither tensor (shard) nor pipeline support in mlx-lm, "
        "so it cannot be split across ranks; load it without a hostfile")


def shard(model, config: dict, group) -> str:
    """Shard `model` in place across `group`; returns the layout's name."""
    shard_support(model, config)
    try:
        model.shard(group)
    except (ValueError, AssertionError) as e:  # e.g. heads not divisible by the group size
        raise UnsupportedModelError(
            f"mlx-lm cannot split model family {family(config)!r} across {group.size()} ranks: {e}") from e
    return f"tensor-parallel/{group.size()}"
