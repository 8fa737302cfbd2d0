"""A BERT encoder's forward over packed tokens on the CPU: no padding, bfloat16 products,
fused attention (engine/cpu/bf16_linear.py, engine/cpu/encoder_attention.py).

The batch's texts are laid end to end ([T] token ids, T = the sum of their lengths) and
`starts` marks where each begins; every layer works on [T, H] rows, so padding costs
nothing (a padded batch of one long and many short texts multiplied the long one's
width). Per layer: one product for Q, K and V together, attention per text and head in
one native call, the output product with its residual add and LayerNorm fused, then the
intermediate product with its GELU fused, and the last product with its add and norm.

Every step works per token or per text in a fixed order, so a text's vector is the
same alone or in any batch. Built by runner.py only when both kernels are available
(the CPU backend with AVX-512 BF16); MLX's padded float32 path (bert.py) runs elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..cpu import bf16_linear, encoder_attention
from . import bert


def available() -> bool:
    """Whether the kernels run here (the CPU backend, AVX-512 BF16, built)."""
    return bf16_linear.available() and encoder_attention.available()


def supported(model: bert.BertModel, config: dict) -> bool:
    """Whether this encoder can run packed here."""
    if not available():
        return False
    h, ffn = config["hidden_size"], config["intermediate_size"]
    return encoder_attention.fits(h, config["num_attention_heads"]) and bf16_linear.fits(h) and bf16_linear.fits(ffn)


@dataclass
class _PackedLayer:
    qkv: bf16_linear.Bf16Linear
    out: bf16_linear.Bf16Linear
    up: bf16_linear.Bf16Linear
    down: bf16_linear.Bf16Linear
    attention_norm: nn.LayerNorm
    output_norm: nn.LayerNorm
    exact_gelu: bool  # erf GELU, fused into `up`; else mlx's tanh approximation after it


@dataclass
class Packed:
    """Texts laid end to end: ids, token types and positions [T]; starts [S + 1]."""

    ids: mx.array
    types: mx.array
    positions: mx.array
    starts: mx.array
    lengths: list[int]

    @classmethod
    def of(cls, batch) -> Packed:
        lengths = [len(e.ids) for e in batch]
        ids = np.concatenate([np.asarray(e.ids, np.int32) for e in batch])
        types = np.concatenate([np.asarray(e.types, np.int32) if e.types else np.zeros(len(e.ids), np.int32)
                                for e in batch])
        positions = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        return cls(mx.array(ids), mx.array(types), mx.array(positions), mx.array(starts), lengths)


class PackedEncoder:
    """The packed forward of `model` (a bert.BertModel): token states [T, H]."""

    def __init__(self, model: bert.BertModel, config: dict):
        self.embeddings = model.embeddings
        self.heads = config["num_attention_heads"]
        self.scale = 1 / math.sqrt(config["hidden_size"] // self.heads)
        self.layers = []
        for layer in model.encoder.layer:
            attn = layer.attention.self
            qkv_weight = mx.concatenate([attn.query.weight, attn.key.weight, attn.value.weight])
            qkv_bias = mx.concatenate([attn.query.bias, attn.key.bias, attn.value.bias])
            self.layers.append(_PackedLayer(
                qkv=bf16_linear.Bf16Linear(qkv_weight, qkv_bias),
                out=_linear(layer.attention.output.dense),
                up=_linear(layer.intermediate.dense),
                down=_linear(layer.output.dense),
                attention_norm=layer.attention.output.LayerNorm,
                output_norm=layer.output.LayerNorm,
                exact_gelu=layer.intermediate.approx == "none"))

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for layer in self.layers for p in (layer.qkv, layer.out, layer.up, layer.down))

    def __call__(self, packed: Packed) -> mx.array:
        e = self.embeddings
        x = e.LayerNorm(e.word_embeddings(packed.ids) + e.position_embeddings(packed.positions)
                        + e.token_type_embeddings(packed.types))
        for layer in self.layers:
            a = encoder_attention.short_attention(layer.qkv(x), packed.starts, self.heads, self.scale)
            a = layer.out.add_norm(a, x, layer.attention_norm)
            h = layer.up(a, gelu=layer.exact_gelu)
            if not layer.exact_gelu:
                h = nn.gelu_approx(h)
            x = layer.down.add_norm(h, a, layer.output_norm)
            # Evaluated layer by layer: with the whole forward as one graph more of its large
            # buffers (up to 25 MB each) are alive at once, the heap grows and shrinks, and
            # fresh pages fault in: ~45,000 page faults and ~25% more CPU per 32 x 128 batch.
            mx.eval(x)
        return x


def _linear(layer: nn.Linear) -> bf16_linear.Bf16Linear:
    return bf16_linear.Bf16Linear(layer.weight, layer["bias"] if "bias" in layer else None)


def pool_packed(hidden: np.ndarray, lengths: list[int], mode: str) -> np.ndarray:
    """Token states [T, H] (float32) -> one vector per text [S, H], as pooling.pool does on
    a padded batch. Per text, over its own rows in order (numpy adds axis-0 rows one
    after another), so a text's vector does not depend on the others."""
    out, start = [], 0
    for n in lengths:
        rows = hidden[start:start + n]
        start += n
        if mode == "mean":
            out.append(rows.sum(axis=0) / np.float32(max(n, 1e-9)))
        elif mode == "cls":
            out.append(rows[0])
        elif mode == "max":
            out.append(rows.max(axis=0))
        elif mode == "lasttoken":
            out.append(rows[-1])
        else:
            raise ValueError(f"unknown pooling mode {mode!r}")
    return np.stack(out).astype(np.float32)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Unit L2 norm per row, as pooling.normalize (each row's sum on its own)."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float32, optimize=False))
    return x / np.maximum(norms, np.float32(1e-12))[:, None]
