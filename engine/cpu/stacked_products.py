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

from .quant_linear import QuantLinear, QuantWeight

# Attribute names of siblings that mlx-lm's layers call on the same input, in that order.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_TILE = 16  # outputs per tile of the packed layout


class _Stack:
    """One product for several modules: computed for the first of them to see a new input,
    then handed out by columns, and dropped once every member has taken its own (so a
    prefill's outputs are not held past their layer)."""

    def __init__(self, weight: QuantWeight, members: int):
        self.weight, self.members = weight, members
        self._x = self._y = None
        self._left = 0

    def columns(self, x: mx.array, lo: int, hi: int) -> mx.array:
        if self._x is not x:  # identity: a held reference, so no other array can take its id
            self._x, self._y, self._left = x, self.weight.matmul(x), self.members
        y = self._y[..., lo:hi]
        self._left -= 1
        if self._left <= 0:
            self._x = self._y = None
        return y


class StackedLinear(nn.Module):
    """A sibling's columns [lo, hi) of a stacked product, plus its own bias."""

    def __init__(self, stack: _Stack, lo: int, hi: int, bias: mx.array | None = None):
        super().__init__()
        self._stack, self._lo, self._hi = stack, lo, hi
        if bias is not None:
            self.bias = bias

    @property
    def weight_stack(self) -> QuantWeight:
        return self._stack.weight

    def __call__(self, x):
        y = self._stack.columns(x, self._lo, self._hi)
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
    stack = _Stack(whole, len(names))
    lo = 0
    for name, linear, w in zip(names, linears, weights):
        setattr(module, name, StackedLinear(stack, lo, lo + w.n, linear["bias"] if "bias" in linear else None))
        lo += w.n


def stack_siblings(model: nn.Module) -> int:
    """Stack each run of consecutive siblings that can share a matrix (e.g. q and k when v
    has another quantization type); returns the number of stacks made."""
    made = 0
    for _, module in list(model.named_modules()):
        for names in SIBLINGS:
            present = [n for n in names if isinstance(module.get(n), QuantLinear)]
            if len(present) != len(names):
                continue
            run = [names[0]]
            for name in names[1:] + (None,):
                if name is not None and _stackable(module[run[-1]]._q, module[name]._q):
                    run.append(name)
                    continue
                if len(run) > 1:
                    _stack(module, run)
                    made += 1
                run = [name]
    return made
