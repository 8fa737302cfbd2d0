"""Per-position recurrent states of GatedDeltaNet layers during a verify forward.

A verify window runs K+1 tokens through the model at once, but a row that
accepts only some of them must continue from the state after its last accepted
token. Attention KV can simply be trimmed; recurrent (delta-rule) and conv
states cannot, so while capturing, each GatedDeltaNet layer records its conv
input (from which the conv state after any position is a slice) and the
recurrent state after every window position, computed by the same
`gated_delta_update` on each prefix of the window.

Probes are installed once per layer/module and record into whichever capture
is active; only the MLX thread runs forwards, so one global slot suffices.
"""

from __future__ import annotations

import sys

import mlx.nn as nn

_active: "RecurrentCapture | None" = None


class _ConvProbe(nn.Module):
    """Wraps a GatedDeltaNet's conv1d to record its input while capturing."""

    def __init__(self, conv):
        super().__init__()
        self.inner = conv

    def __call__(self, x):
        if _active is not None:
            _active.records.append({"conv_input": x})
        return self.inner(x)


def _probe_update(original):
    def gated_delta_update(q, k, v, a, b, A_log, dt_bias, state=None, mask=None, **kw):
        out, final = original(q, k, v, a, b, A_log, dt_bias, state, mask, **kw)
        if _active is not None:
            states = [original(q[:, :t + 1], k[:, :t + 1], v[:, :t + 1], a[:, :t + 1],
                               b[:, :t + 1], A_log, dt_bias, state,
                               None if mask is None else mask[:, :t + 1], **kw)[1]
                      for t in range(q.shape[1] - 1)]
            _active.records[-1]["states"] = states + [final]
        return out, final

    gated_delta_update.kernelext_probe = True
    return gated_delta_update


class RecurrentCapture:
    def __init__(self, model):
        self.records: list[dict] = []
        self.layers = [m for _, m in model.named_modules()
                       if hasattr(m, "conv1d") and hasattr(m, "conv_kernel_size")
                       and hasattr(m, "A_log")]
        for layer in self.layers:
            if not isinstance(layer.conv1d, _ConvProbe):
                layer.conv1d = _ConvProbe(layer.conv1d)
            module = sys.modules[type(layer).__module__]
            if not getattr(module.gated_delta_update, "kernelext_probe", False):
                module.gated_delta_update = _probe_update(module.gated_delta_update)

    def __enter__(self):
        global _active
        self.records = []
        _active = self
        return self

    def __exit__(self, *exc):
        global _active
        _active = None
