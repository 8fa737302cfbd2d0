"""Sibling products of one input (an attention's q/k/v, an MLP's gate/up) run as one.

mlx-lm's layers call q_proj(x), k_proj(x) and v_proj(x) (gate_proj(x) and up_proj(x)) one
after another on the same x. With quantized weights each call quantizes x again and wakes
the kernels' workers again, and k and v alone are too small to split over threads. So the
siblings' packed matrices are stacked at load into one (`stack_siblings`): the first call of
a step computes every sibling's columns in one product, and each sibling takes its own.

Exactness: the packed layout's tiles of 16 outputs are independent (quant_layout.py), and a
stacked matrix is its members' tiles one after another, multiplied by the same quantized
activations, so every output has the bits it had as its own product.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .memory import release_freed_memory
from .quant_layout import TILE as _TILE  # outputs per tile of the packed layout
from .quant_linear import QuantLinear, QuantWeight

# Attribute names of siblings that mlx-lm's layers call on the same input, in that order.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
SHARED_ROWS = 16  # up to this many rows a call shares one product (the kernels' decode rows)


class _Stack:
    """One product for several modules: for a few rows (decode steps, verify windows)
    computed for the first member to see a new input, then handed out by columns, and
    dropped once every member has taken its own. Many rows (prefill) are compute-bound
    and gain nothing from sharing, while each member's columns would be copied out of the
    stack: each member multiplies by its own tiles then, a view into the stack."""

    def __init__(self, weight: QuantWeight, sizes: list[int]):
        self.weight, self.members = weight, len(sizes)
        self.parts = []  # each member's rows of the stack, as a matrix of its own (a view)
        lo = 0
        for n in sizes:
            part = QuantWeight(weight.packed[lo // _TILE:(lo + n + _TILE - 1) // _TILE], n, weight.k, weight.format)
            part.levels = weight.levels
            self.parts.append(part)
            lo += n
        mx.eval([p.packed for p in self.parts])
        self._x = self._y = None
        self._left = 0

    def columns(self, x: mx.array, member: int, lo: int, hi: int) -> mx.array:
        if x.size // max(1, x.shape[-1]) > SHARED_ROWS:
            return self.parts[member].matmul(x)
        if self._x is not x:  # identity: a held reference, so no other array can take its id
            self._x, self._y, self._left = x, self.weight.matmul(x), self.members
        y = self._y[..., lo:hi]
        self._left -= 1
        if self._left <= 0:
            self._x = self._y = None
        return y


class StackedLinear(nn.Module):
    """A sibling's columns [lo, hi) of a stacked product, plus its own bias."""

    def __init__(self, stack: _Stack, member: int, lo: int, hi: int, bias: mx.array | None = None):
        super().__init__()
        self._stack, self._member, self._lo, self._hi = stack, member, lo, hi
        if bias is not None:
            self.bias = bias

    @property
    def weight_stack(self) -> QuantWeight:
        return self._stack.weight

    def __call__(self, x):
        y = self._stack.columns(x, self._member, self._lo, self._hi)
        return y + self["bias"] if "bias" in self else y


def _stackable(a: QuantWeight, b: QuantWeight) -> bool:
    """b may follow a in one matrix: same input width, format and activation levels, and a
    fills whole tiles (so b's rows start a tile)."""
    return a.k == b.k and a.format == b.format and a.levels == b.levels and a.n % _TILE == 0


def _stack(module: nn.Module, names: list[str]) -> None:
    linears = [module[name] for name in names]
    weights = [linear._q for linear in linears]
    packed = mx.concatenate([w.packed for w in weights], axis=0)
    mx.eval(packed)
    whole = QuantWeight(packed, sum(w.n for w in weights), weights[0].k, weights[0].format)
    whole.levels = weights[0].levels
    stack = _Stack(whole, [w.n for w in weights])
    lo = 0
    for member, (name, linear, w) in enumerate(zip(names, linears, weights)):
        setattr(module, name, StackedLinear(stack, member, lo, lo + w.n, linear["bias"] if "bias" in linear else None))
        lo += w.n


def stack_siblings(model: nn.Module) -> int:
    """Stack each run of consecutive siblings that can share a matrix (e.g. q and k when v
    has another quantization type); returns the number of stacks made."""
    made = 0
    # The layers holding siblings, not every module: the replaced matrices must have no
    # other reference, so that each stack's members are freed as soon as it is made.
    parents = [m for _, m in model.named_modules()
               if any(isinstance(m.get(n), QuantLinear) for names in SIBLINGS for n in names)]
    for module in parents:
        for names in SIBLINGS:
            if not all(isinstance(module.get(n), QuantLinear) for n in names):
                continue
            runs = [[names[0]]]
            for prev, name in zip(names, names[1:]):
                if _stackable(module[prev]._q, module[name]._q):
                    runs[-1].append(name)
                else:
                    runs.append([name])
            for run in (r for r in runs if len(r) > 1):
                _stack(module, run)
                # Give the members' buffers back now: MLX would keep them for reuse (no later
                # buffer has their sizes) and glibc would keep the freed heap; else the
                # load's peak grew by the stacks (Qwen3-1.7B's shape: 1,639 -> 2,116 MB).
                mx.clear_cache()
                release_freed_memory()
                made += 1
    return made
