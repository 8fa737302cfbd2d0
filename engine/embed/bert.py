"""BERT-family encoders in MLX: the sentence-embedding trunk and the cross-encoder.

Written here rather than taken from mlx-embeddings: that package pulls in mlx-vlm
and the Hugging Face hub client, always mean-pools and normalizes whatever the
model's sentence-transformers config says, masks padding with -10000 rather than
excluding it, and has no sequence-classification head for cross-encoders. The
module and parameter names follow Hugging Face's BertModel, so checkpoints load
as they are.
"""

from __future__ import annotations

import math
from functools import partial

import mlx.core as mx
import mlx.nn as nn


class _Embeddings(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        h = c["hidden_size"]
        self.word_embeddings = nn.Embedding(c["vocab_size"], h)
        self.position_embeddings = nn.Embedding(c["max_position_embeddings"], h)
        self.token_type_embeddings = nn.Embedding(c.get("type_vocab_size", 2), h)
        self.LayerNorm = nn.LayerNorm(h, eps=c.get("layer_norm_eps", 1e-12))

    def __call__(self, ids: mx.array, token_types: mx.array) -> mx.array:
        positions = mx.arange(ids.shape[1])[None]
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(positions)
                              + self.token_type_embeddings(token_types))


class _SelfAttention(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        h = c["hidden_size"]
        self.n_heads = c["num_attention_heads"]
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        B, L, H = x.shape
        q, k, v = (p(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
                   for p in (self.query, self.key, self.value))
        scores = (q * (1 / math.sqrt(H // self.n_heads))) @ k.transpose(0, 1, 3, 2)
        return (masked_softmax(scores, mask) @ v).transpose(0, 2, 1, 3).reshape(B, L, H)


class _DenseNorm(nn.Module):
    """dense -> residual add -> LayerNorm (BertSelfOutput and BertOutput)."""

    def __init__(self, c: dict, d_in: int):
        super().__init__()
        self.dense = nn.Linear(d_in, c["hidden_size"])
        self.LayerNorm = nn.LayerNorm(c["hidden_size"], eps=c.get("layer_norm_eps", 1e-12))

    def __call__(self, x: mx.array, residual: mx.array) -> mx.array:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.self = _SelfAttention(c)
        self.output = _DenseNorm(c, c["hidden_size"])

    def __call__(self, x, mask):
        return self.output(self.self(x, mask), x)


# erf by Abramowitz & Stegun 7.1.28 (|error| <= 3e-7): only multiplies, adds and one
# division, fused by mx.compile. MLX's CPU erf (and exp, tanh) evaluate element by element
# through libm: on a 32 x 128-token MiniLM batch nn.gelu took 360 ms per layer, this 100 ms
# (torch: 27 ms), and GELU outputs differ from the exact ones by at most 1e-6.
_ERF = (0.0705230784, 0.0422820123, 0.0092705272, 0.0001520143, 0.0002765672, 0.0000430638)


@partial(mx.compile, shapeless=True)
def gelu_erf(x: mx.array) -> mx.array:
    a = mx.abs(x) * 0.7071067811865476
    c = _ERF
    p = 1 + a * (c[0] + a * (c[1] + a * (c[2] + a * (c[3] + a * (c[4] + a * c[5])))))
    p = p * p
    p = p * p
    p = p * p
    p = p * p  # ^16
    erf = 1 - 1 / p
    return 0.5 * x * (1 + mx.where(x < 0, -erf, erf))


# exp by range reduction (x = n ln2 + r, |r| <= ln2/2), a degree-7 polynomial in r and
# 2^n written into the exponent bits, fused by mx.compile: the same reason as gelu_erf
# (MLX's CPU exp is libm element by element). The softmax of attention scores, 6M
# elements a layer on a 32 x 128-token batch, went from 300 to 130 ms; it differs from
# mx.softmax by at most 3e-7.
_LN2_HI, _LN2_LO, _LOG2E = 0.693359375, -2.12194440e-4, 1.4426950408889634


@partial(mx.compile, shapeless=True)
def _exp_parts(x: mx.array) -> tuple[mx.array, mx.array]:
    """exp(x) = p * 2^n: p, and 2^n's float32 bits (a view is not shapeless-compilable)."""
    x = mx.clip(x, -87.0, 88.0)
    n = mx.floor(x * _LOG2E + 0.5)
    r = x - n * _LN2_HI - n * _LN2_LO
    p = 1 + r * (1 + r * (1 / 2 + r * (1 / 6 + r * (1 / 24 + r * (1 / 120 + r * (1 / 720 + r / 5040))))))
    return p, mx.left_shift(n.astype(mx.int32) + 127, 23)


def masked_softmax(scores: mx.array, mask: mx.array) -> mx.array:
    """Softmax over the last axis where mask [B, 1, 1, L] is True (a token); padded keys
    get exactly 0 weight."""
    top = mx.where(mask, scores, -mx.inf).max(axis=-1, keepdims=True)
    p, bits = _exp_parts(scores - top)
    e = mx.where(mask, p * bits.view(mx.float32), 0.0)
    return e / e.sum(axis=-1, keepdims=True)


class _Intermediate(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        if c.get("hidden_act", "gelu") not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"hidden_act {c['hidden_act']!r} is not supported")
        self.approx = "none" if c.get("hidden_act", "gelu") == "gelu" else "tanh"
        self.dense = nn.Linear(c["hidden_size"], c["intermediate_size"])

    def __call__(self, x):
        x = self.dense(x)
        return gelu_erf(x) if self.approx == "none" else nn.gelu_approx(x)


class _Layer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.attention = _Attention(c)
        self.intermediate = _Intermediate(c)
        self.output = _DenseNorm(c, c["intermediate_size"])

    def __call__(self, x, mask):
        a = self.attention(x, mask)
        return self.output(self.intermediate(a), a)


class _Encoder(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.layer = [_Layer(c) for _ in range(c["num_hidden_layers"])]


class _Pooler(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.dense = nn.Linear(c["hidden_size"], c["hidden_size"])

    def __call__(self, hidden):
        return mx.tanh(rowwise_linear(self.dense, hidden[:, 0]))


class BertModel(nn.Module):
    def __init__(self, config: dict, pooler: bool = False):
        super().__init__()
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)
        if pooler:
            self.pooler = _Pooler(config)

    def __call__(self, ids: mx.array, mask: mx.array, token_types: mx.array | None = None) -> mx.array:
        """Token states [B, L, H]; ids, mask (1 = token, padding on the right) and
        token_types are [B, L]."""
        x = self.embeddings(ids, mx.zeros_like(ids) if token_types is None else token_types)
        attend = mask.astype(mx.bool_)[:, None, None, :]
        for layer in self.encoder.layer:
            x = layer(x, attend)
        return x


class BertForSequenceClassification(nn.Module):
    """A cross-encoder: [CLS] query [SEP] document [SEP] -> pooler -> classifier logits."""

    def __init__(self, config: dict):
        super().__init__()
        self.bert = BertModel(config, pooler=True)
        labels = len(config.get("id2label") or {}) or config.get("num_labels", 1)
        self.classifier = nn.Linear(config["hidden_size"], labels)

    def __call__(self, ids, mask, token_types=None) -> mx.array:
        return rowwise_linear(self.classifier, self.bert.pooler(self.bert(ids, mask, token_types)))


def rowwise_linear(layer: nn.Linear, x: mx.array) -> mx.array:
    """layer(x) for a few rows [B, d], each row's result independent of B: a GEMM picks
    its kernel by the row count (one row goes to GEMV), which changes the last bits,
    and a head this small costs nothing as a broadcast product and sum."""
    out = (x[:, None, :] * layer.weight[None]).sum(axis=-1)
    return out + layer.bias if "bias" in layer else out


def sanitize(weights: dict, cross_encoder: bool) -> dict:
    """Hugging Face names -> this module's (old checkpoints' gamma/beta, position_ids)."""
    out = {}
    for name, w in weights.items():
        if name.endswith("position_ids"):
            continue
        name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if not cross_encoder:
            name = name.removeprefix("bert.")
            if name.startswith(("pooler.", "cls.")):
                continue  # embeddings pool token states themselves
        out[name] = w
    return out
