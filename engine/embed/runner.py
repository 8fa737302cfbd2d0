"""Loads a pooling model's weights and runs one padded batch (MLX thread only).

Encoders are padded on the right with an attention mask; decoders on the left,
through mlx-lm's BatchKVCache (which masks the padding and starts every row's
positions at 0), so a row's last position is its last token. On the CPU with the
encoder kernels, BERT encoders run packed instead (packed_encoder.py: no padding).
"""

from __future__ import annotations

import glob
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import BatchKVCache

from ..errors import ModelLoadError
from ..models.loader import load_mlx_lm, on_cpu, output_projection, resident_model, to_dtype
from . import bert, packed_encoder
from .model_kinds import PoolingSpec
from .pooling import normalize, pool
from .tokenize import Encoded


def _load_encoder(path: Path, spec: PoolingSpec):
    cross = spec.task == "rerank"
    model = bert.BertForSequenceClassification(spec.config) if cross else bert.BertModel(spec.config)
    weights = {}
    for file in sorted(glob.glob(str(path / "*.safetensors"))):
        weights.update(mx.load(file))
    if not weights:
        raise ModelLoadError(f"{path} has no *.safetensors weights")
    try:
        model.load_weights(list(bert.sanitize(weights, cross).items()))
    except ValueError as e:
        raise ModelLoadError(f"{path}: the weights do not fit a {spec.config['model_type']} model: {e}") from e
    return model


class PoolingRunner:
    def __init__(self, path: Path, spec: PoolingSpec, dtype: str = "auto",
                 yes_no: tuple[int, int] | None = None):
        self.spec, self.yes_no = spec, yes_no
        shared = resident_model(path, dtype) if spec.family == "decoder" else None
        if shared is not None:  # the chat model's own weights (its row kernels only act in decode)
            self.model = shared
        else:
            model = _load_encoder(path, spec) if spec.family == "encoder" else load_mlx_lm(path)[0]
            self.model = to_dtype(model, spec.config, dtype)
        self.shares_weights = shared is not None
        self.packed = None
        if spec.family == "encoder":
            trunk = self.model.bert if spec.task == "rerank" else self.model
            if trunk.embeddings.word_embeddings.weight.dtype == mx.float32 and \
                    packed_encoder.supported(trunk, spec.config):
                self.packed = packed_encoder.PackedEncoder(trunk, spec.config)
        self.dtype = ",".join(sorted({str(p.dtype).removeprefix("mlx.core.") for _, p in
                                      tree_flatten(self.model.parameters())}))
        self.weight_bytes = 0 if shared is not None else sum(
            p.nbytes for _, p in tree_flatten(self.model.parameters()))
        if self.packed is not None:
            self.dtype += " (bfloat16 products)"
            self.weight_bytes += self.packed.nbytes
        self.backend = "cpu" if on_cpu() else "gpu"

    def run(self, batch: list[Encoded]) -> np.ndarray:
        """Embeddings [B, dim] (task embed) or relevance scores [B] (task rerank), float32."""
        if self.packed is not None:
            return self._packed(batch)
        out = self._encoder(batch) if self.spec.family == "encoder" else self._decoder(batch)
        out = out.astype(mx.float32)
        mx.eval(out)
        return np.array(out)

    def _encoder(self, batch: list[Encoded]) -> mx.array:
        width = padded_width(max(len(e.ids) for e in batch))
        ids = np.zeros((len(batch), width), np.int32)
        types = np.zeros_like(ids)
        mask = np.zeros_like(ids)
        for i, e in enumerate(batch):
            ids[i, :len(e.ids)] = e.ids
            mask[i, :len(e.ids)] = 1
            if e.types:
                types[i, :len(e.types)] = e.types
        ids, types, mask = mx.array(ids), mx.array(types), mx.array(mask)
        if self.spec.task == "rerank":
            return _relevance(self.model(ids, mask, types))
        vectors = pool(self.model(ids, mask, types), mask, self.spec.pooling)
        return normalize(vectors) if self.spec.normalize else vectors

    def token_states(self, encoded: Encoded) -> np.ndarray:
        """An encoder's last token states [n, H] of one input, through the trunk `run` uses."""
        if self.packed is not None:
            return np.array(self.packed(packed_encoder.Packed.of([encoded])))
        trunk = self.model.bert if self.spec.task == "rerank" else self.model
        ids = mx.array([encoded.ids])
        types = mx.array([encoded.types]) if encoded.types else None
        return np.array(trunk(ids, mx.ones(ids.shape, mx.int32), types)[0])

    def _packed(self, batch: list[Encoded]) -> np.ndarray:
        packed = packed_encoder.Packed.of(batch)
        hidden = self.packed(packed)
        if self.spec.task == "rerank":
            first = hidden[packed.starts[:-1]]  # each pair's [CLS]
            out = _relevance(bert.rowwise_linear(self.model.classifier, self.model.bert.pooler(first[:, None])))
            mx.eval(out)
            return np.array(out.astype(mx.float32))
        mx.eval(hidden)
        vectors = packed_encoder.pool_packed(np.array(hidden), packed.lengths, self.spec.pooling)
        return packed_encoder.normalize_rows(vectors) if self.spec.normalize else vectors

    def _decoder(self, batch: list[Encoded]) -> mx.array:
        width = padded_width(max(len(e.ids) for e in batch))
        pads = [width - len(e.ids) for e in batch]
        ids = mx.array([[0] * p + e.ids for p, e in zip(pads, batch)])
        trunk = getattr(self.model, "language_model", self.model).model
        cache = [BatchKVCache(pads) for _ in trunk.layers]
        last = trunk(ids, cache=cache)[:, -1]  # the final norm's output at each row's last token
        if self.spec.task == "rerank":
            # Only the "no" and "yes" rows of the output projection, row by row (as
            # bert.rowwise_linear, so a document's score does not depend on its batch).
            rows = output_projection(self.model).weight[mx.array(self.yes_no[::-1])]  # [2, H]
            logits = (last[:, None, :] * rows[None]).sum(axis=-1).astype(mx.float32)
            return mx.softmax(logits, axis=-1)[:, 1]
        return normalize(last) if self.spec.normalize else last


# Padding is masked out, so it cannot change a row's result in exact arithmetic; in
# float32 it does not either once every row is at least this wide (measured on
# all-MiniLM-L6-v2 with MKL: a 4-token text came out 1e-7 different alone than
# padded to 12 tokens, through the reductions' short-length code paths; at 16 and
# more, alone and padded are bit-identical). Widths are rounded up to a multiple.
PAD_MULTIPLE = 16


def padded_width(width: int) -> int:
    return -(-width // PAD_MULTIPLE) * PAD_MULTIPLE


def _relevance(logits: mx.array) -> mx.array:
    """A cross-encoder's score in [0, 1]: sigmoid of a single logit (sentence-transformers'
    CrossEncoder default), or the last label's probability for a classifier of several."""
    logits = logits.astype(mx.float32)
    if logits.shape[-1] == 1:
        return mx.sigmoid(logits[:, 0])
    return mx.softmax(logits, axis=-1)[:, -1]
