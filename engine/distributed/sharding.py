"""Split one model's weights across the ranks of a group, with mlx-lm's own sharding.

Two layouts, both mlx-lm's:
  tensor    `model.shard(group)`: attention heads and MLP columns are split, and each
            block's output projection sums the ranks' partial results (all_sum). Every
            rank runs every layer on its slice.
  pipeline  `model.model.pipeline(group)`: each rank keeps a contiguous run of layers
            (rank 0 the last ones); hidden states go rank to rank with send/recv and
            the last rank's output is all_gathered, so every rank computes the logits.
"auto" picks tensor where the family has it (as mlx-lm's sharded_load does), else
pipeline. A request's cache on a rank covers that rank's layers (mlx-lm's
make_cache follows `pipeline_layers`), so each rank's prefix cache handlers are
built from its own template and its blocks stay its own.
"""

from __future__ import annotations

from ..errors import UnsupportedModelError

LAYOUTS = ("auto", "tensor", "pipeline")


def family(config: dict) -> str:
    text = config.get("text_config") or {}
    return config.get("model_type") or text.get("model_type") or "unknown"


def _pipeline_module(model):
    inner = getattr(model, "model", None)
    return inner if hasattr(inner, "pipeline") else None


def choose_layout(model, config: dict, wanted: str = "auto") -> str:
    """"tensor" or "pipeline" for this model; UnsupportedModelError naming the family
    when mlx-lm has neither (or not the one asked for)."""
    name = family(config)
    tensor, pipeline = hasattr(model, "shard"), _pipeline_module(model) is not None
    if wanted in ("auto", "tensor") and tensor:
        return "tensor"
    if wanted in ("auto", "pipeline") and pipeline:
        return "pipeline"
    if tensor or pipeline:
        has = "tensor" if tensor else "pipeline"
        raise UnsupportedModelError(
            f"model family {name!r} supports only {has} parallelism in mlx-lm, not {wanted}")
    raise UnsupportedModelError(
        f"model family {name!r} has neither tensor (shard) nor pipeline support in mlx-lm, "
        "so it cannot be split across ranks; load it without a hostfile")


def shard(model, config: dict, group, layout: str) -> None:
    """Shard `model` in place across `group` (before its weights are evaluated, so each
    rank reads only its own part)."""
    try:
        if layout == "tensor":
            model.shard(group)
        else:
            _pipeline_module(model).pipeline(group)
    except (ValueError, AssertionError) as e:  # e.g. heads not divisible by the group size
        raise UnsupportedModelError(
            f"mlx-lm cannot split model family {family(config)!r} across {group.size()} ranks "
            f"({layout}): {e}") from e
