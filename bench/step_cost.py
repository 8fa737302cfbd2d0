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
work as in a real step. The step and its product-free form are also timed with mlx-lm's own
norms and RoPE put back (engine/cpu/fused_layers.py swapped out), to show what the compiled
ones save.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np

try:  # the compiled norms and RoPE (engine/cpu/fused_layers.py), compared with mlx-lm's
    from engine.cpu import fused_layers
except ImportError:
    fused_layers = None

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
    plain = "mlx-lm layers" in parts and fused_layers is not None
    if plain:
        plain = fused_layers.uninstall(model) > 0
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
            if hasattr(original, "as_linear"):  # tied embedding: keep the lookup, drop the projection
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
        if plain:
            fused_layers.install(model)


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
            ("mlx-lm layers", {"mlx-lm layers"}),
            ("mlx-lm layers, no products", {"mlx-lm layers", "products"}),
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
    times: dict[str, list] = {}  # wall ms
    cpu: dict[str, list] = {}  # CPU ms of this process (all its threads): robust to other jobs

    def step(name, parts):
        with _swapped(model, parts, widths, head, args.vocab_size), decode_products(model):
            c0, t0 = time.process_time(), time.perf_counter()
            logits = runner.decode([7])
            c1, t1 = time.process_time(), time.perf_counter()
            mx.eval(logits)
            c2, t2 = time.process_time(), time.perf_counter()
        int(np.argmax(np.asarray(memoryview(logits.astype(mx.float32)))[0]))
        c3, t3 = time.process_time(), time.perf_counter()
        for key, dt, dc in ((name, t3 - t0, c3 - c0), (name + ":graph", t1 - t0, c1 - c0),
                            (name + ":sampling", t3 - t2, c3 - c2)):
            times.setdefault(key, []).append(1000 * dt)
            cpu.setdefault(key, []).append(1000 * dc)

    try:
        for r in range(rounds + 2):
            for name, parts in VARIANTS:
                step(name, parts)
    finally:
        runner.reset()
    return {"wall": _parts(times), "cpu": _parts(cpu)}


def _parts(samples: dict) -> dict:
    med = {k: statistics.median(v[2:]) for k, v in samples.items()}  # the first rounds warm up
    out = {"step": med["step"], "outside": med["no products"],
           "products": med["step"] - med["no products"],
           "norms": med["no products"] - med["no norms"],
           "rope": med["no norms"] - med["no rope"],
           "attention": med["no rope"] - med["no attention"],
           "graph": med["no attention:graph"], "sampling": med["no attention:sampling"]}
    out["other"] = med["no attention"] - out["graph"] - out["sampling"]
    out["plain step"] = med["mlx-lm layers"]
    out["plain outside"] = med["mlx-lm layers, no products"]
    return out


def report(eng) -> dict:
    r = eng.call(lambda: measure(eng._loaded.model, eng.encode))
    w, c = r["wall"], r["cpu"]
    print("\n## Where a batch-1 decode step goes, median ms by ablation (target <= 5 ms outside products)")
    print(f"{'':54} {'wall':>7} {'CPU':>7}  (CPU: this process's threads, robust to other jobs)")
    rows = (("step: graph + evaluation + host sampling", "step"),
            ("  matrix products", "products"),
            ("  outside the products", "outside"),
            ("    RMS norms", "norms"), ("    RoPE", "rope"), ("    attention", "attention"),
            ("    building the graph (Python)", "graph"), ("    host sampling (argmax)", "sampling"),
            ("    other: cache, masks, embedding, activations, adds", "other"))
    for label, key in rows:
        note = "   target <= 5.0" if key == "outside" else ""
        print(f"{label:54} {w[key]:7.2f} {c[key]:7.2f}{note}")
    if fused_layers is not None:
        print(f"{'with mlx-lm own norms and RoPE (interleaved): step':54} {w['plain step']:7.2f} "
              f"{c['plain step']:7.2f}")
        print(f"{'  outside the products':54} {w['plain outside']:7.2f} {c['plain outside']:7.2f}   "
              f"compiled norms and RoPE save {c['plain outside'] - c['outside']:.2f} ms CPU a step")
    return r
