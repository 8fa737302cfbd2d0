"""engine/models/overlapped_layers.py: decoder layers started with mx.async_eval while the
rest of the step's graph is built. The same arrays are computed, only earlier: tokens and
logits must be bit-identical with and without, through a cache as the engine decodes."""

import engine  # noqa: F401  (BLAS before mlx)
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_lm_load
from mlx_lm.models.cache import make_prompt_cache

from engine.models import overlapped_layers
from tiny_models import tiny_model


def decode(model, ids, overlap: bool) -> list[np.ndarray]:
    """Logits of a 12-token prompt, then of 8 single-token steps through the cache."""
    cache = make_prompt_cache(model)
    out = [np.array(model(ids[:, :12], cache=cache))]
    for i in range(12, 20):
        with overlapped_layers.overlapped(overlap):
            step = model(ids[:, i:i + 1], cache=cache)
        mx.eval(step)
        out.append(np.array(step))
    return out


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "qwen3_5"])
def test_overlapped_steps_are_bit_identical(family):
    model, tok = mlx_lm_load(str(tiny_model(family)))
    ids = mx.array(tok.encode("def fibonacci(n): a long story about bees " * 3)[:20])[None]
    names = [k for k, _ in tree_flatten(model.parameters())]
    want = decode(model, ids, overlap=False)
    assert overlapped_layers.install(model) == len(model.layers)
    assert overlapped_layers.install(model) == len(model.layers)  # twice: no subclass of a subclass
    assert all(type(layer).__bases__[0] not in overlapped_layers._subclasses.values() for layer in model.layers)
    assert [k for k, _ in tree_flatten(model.parameters())] == names
    for overlap in (False, True):
        got = decode(model, ids, overlap)
        assert all(np.array_equal(a, b) for a, b in zip(got, want)), overlap
