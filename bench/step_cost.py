"""Where one batch-1 decode step's time goes, inside and outside the matrix products.

Measured on the engine's MLX thread, with its own model runner and weights, by ablation:
the same decode step is timed whole, then with parts of the model swapped for stand-ins
that cost nothing (a product returns zeros of its output's shape, a norm or a RoPE returns
its input, attention returns its queries), one more part each time:
  step                        graph building + evaluation + host sampling (argmax over a
                              numpy view of the logits, as the engine samples greedily)
  products                    step - step without the products
  outside products            step without the products: the issue's <= 5 ms target
    norms / RoPE / attention  what each removes from that
    building the graph        Python time of the forward before anything runs
    host sampling             argmax on the host
    other                     what is left: reshapes, cache writes, masks, embedding,
                              activations, residual adds, dispatch
The variants run interleaved, round by round, so drift hits all alike; medians are printed.
Stand-ins change the values computed, never the shapes, so every kernel left does the same
work as in a real step.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np

PRODUCTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _imports():
    try:
        from engine.core.model_runner import ModelRunner
    except ImportError:
        from engine.model_runner import ModelRunner
    try:
        from engine.models.loader import decode_products, output_projection
    except ImportError:
        from engine.loader import decode_products, output_projection
    return ModelRunner, decode_products, output_projection


class _ZeroProduct(nn.Module):
    def __init__(self, out_dim: int):
        super().__init__()
        self.out_dim = out_dim

    def __call__(self, x):
        return mx.zeros((*x.shape[:-1], self.out_dim), x.dtype)

    def as_linear(self, x):
        return self(x)


class _Identity(nn.Module):
    def __call__(self, x, *args, **kwargs):
        return x


@contextlib.contextmanager
def _swapped(model, parts: set[str], widths: dict[str, int], head_path: tuple, vocab: int):
    """Within: the named parts of `model` replaced by stand-ins; restored on exit."""
    saved = []  # (parent, attribute, original)

    def swap(parent, name, new):
        saved.append((parent, name, getattr(parent, name)))
        setattr(parent, name, new)

    lm = getattr(model, "language_model", model)
    attn_module = None
    try:
        for layer in lm.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn_module = sys.modules[type(attn).__module__]
            if "products" in parts:
                for name in PRODUCTS:
                    owner = attn if hasattr(attn, name) else mlp
                    if hasattr(owner, name):
                        swap(owner, name, _ZeroProduct(widths[name]))
            if "norms" in parts:
                for owner in (layer, attn):
                    for name, child in list(owner.children().items()):
                        if isinstance(child, nn.Module) and "norm" in name:
                            swap(owner, name, _Identity())
            if "rope" in parts and hasattr(attn, "rope"):
                swap(attn, "rope", _Identity())
        if "norms" in parts:
            swap(lm.model, "norm", _Identity())
        if "products" in parts:
            parent, name = head_path
            original = getattr(parent, name)
            if isinstance(original, nn.Embedding):  # tied: keep the lookup, drop the projection
                stand_in = _TiedStandIn(original, vocab)
            else:
                stand_in = _ZeroProduct(vocab)
            swap(parent, name, stand_in)
        if "attention" in parts and attn_module is not None:
            swap(attn_module, "scaled_dot_product_attention", lambda q, k, v, **kw: q)
        yield
    finally:
        for parent, name, original in reversed(saved):
            setattr(parent, name, original)


class _TiedStandIn(nn.Module):
    def __init__(self, embedding, vocab: int):
        super().__init__()
        self.embedding = embedding
        self.vocab = vocab

    def __call__(self, x):
        return self.embedding(x)

    def as_linear(self, x):
        return mx.zeros((*x.shape[:-1], self.vocab), mx.float32)


def _head_path(model, output_projection):
    head = output_projection(model)
    for _, module in model.named_modules():
        for name, child in module.children().items():
            if child is head:
                return module, name
    raise RuntimeError("output projection not found")


VARIANTS = (("step", set()),
            ("no products", {"products"}),
            ("no norms", {"products", "norms"}),
            ("no rope", {"products", "norms", "rope"}),
            ("no attention", {"products", "norms", "rope", "attention"}))


def measure(model, encode, rounds: int = 25) -> dict:
    """Median ms per variant of a batch-1 decode step (call on the engine's MLX thread)."""
    ModelRunner, decode_products, output_projection = _imports()
    lm = getattr(model, "language_model", model)
    args = lm.args
    attn = lm.model.layers[0].self_attn
    widths = {"q_proj": attn.n_heads * attn.head_dim, "k_proj": attn.n_kv_heads * attn.head_dim,
              "v_proj": attn.n_kv_heads * attn.head_dim, "o_proj": args.hidden_size,
              "gate_proj": args.intermediate_size, "up_proj": args.intermediate_size,
              "down_proj": args.hidden_size}
    head = _head_path(model, output_projection)
    runner = ModelRunner(model)
    cache = runner.new_cache()
    runner.prefill(cache, encode("The quick brown fox jumps over the lazy dog. " * 6)[:64], [0])
    runner.add_rows([cache])
    times: dict[str, list] = {}

    def step(name, parts):
        with _swapped(model, parts, widths, head, args.vocab_size), decode_products(model):
            t0 = time.perf_counter()
            logits = runner.decode([7])
            t1 = time.perf_counter()
            mx.eval(logits)
            t2 = time.perf_counter()
        int(np.argmax(np.asarray(memoryview(logits.astype(mx.float32)))[0]))
        t3 = time.perf_counter()
        for key, dt in ((name, t3 - t0), (name + ":graph", t1 - t0), (name + ":sampling", t3 - t2)):
            times.setdefault(key, []).append(1000 * dt)

    try:
        for r in range(rounds + 2):
            for name, parts in VARIANTS:
                step(name, parts)
    finally:
        runner.reset()
    med = {k: statistics.median(v[2:]) for k, v in times.items()}  # the first rounds warm up
    out = {"step": med["step"], "outside": med["no products"],
           "products": med["step"] - med["no products"],
           "norms": med["no products"] - med["no norms"],
           "rope": med["no norms"] - med["no rope"],
           "attention": med["no rope"] - med["no attention"],
           "graph": med["no attention:graph"], "sampling": med["no attention:sampling"]}
    out["other"] = med["no attention"] - out["graph"] - out["sampling"]
    return out


def report(eng) -> dict:
    r = eng.call(lambda: measure(eng._loaded.model, eng.encode))
    print("\n## Where a batch-1 decode step goes, median ms (by ablation; target <= 5 ms outside products)")
    rows = (("step: graph + evaluation + host sampling", "step"),
            ("  matrix products", "products"),
            ("  outside the products", "outside"),
            ("    RMS norms", "norms"), ("    RoPE", "rope"), ("    attention", "attention"),
            ("    building the graph (Python)", "graph"), ("    host sampling (argmax)", "sampling"),
            ("    other: cache, masks, embedding, activations, adds", "other"))
    for label, key in rows:
        note = "   target <= 5.0" if key == "outside" else ""
        print(f"{label:54} {r[key]:7.2f}{note}")
    return r
