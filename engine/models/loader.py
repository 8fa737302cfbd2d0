"""Load an mlx-lm model directory into memory, in the engine's fast dtype."""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache
from mlx_lm.utils import _get_classes, dequantize_model, load_model

from ..cpu import fused_layers, quant_linear, row_kernels, stacked_products
from ..cpu.memory import release_freed_memory
from ..cpu.packed_gemm import MAX_ROWS, PackedMatrix
from ..errors import ModelLoadError, UnsupportedModelError
from . import quantized as quantized_weights
from . import overlapped_layers, row_attention
from .tokenizer import load_tokenizer


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object  # mlx_lm TokenizerWrapper
    config: dict
    path: Path
    dtype: str
    quantized: bool  # the checkpoint was quantized (it may have been dequantized for speed)
    max_context: int
    vocab_size: int
    row_kernel_bytes: int = 0  # RAM held by the row kernels' blocked weights (engine/cpu/row_kernels.py)
    quantized_weight_bytes: int = 0  # RAM of weights kept quantized for the CPU kernels (cpu/quant_linear.py)
    parameter_bytes: int = 0  # RAM of the model's MLX parameters (quantized kernels' weights are not among them)
    # A forward gives every row the same bits however the prompt is cut into chunks
    # (`chunk_invariant()`): prefill may then run chunks larger than a prefix-cache block.
    chunk_invariant: bool = False

    @property
    def weight_bytes(self) -> int:
        """Everything the loaded weights hold in RAM (the model registry's memory budget)."""
        return self.parameter_bytes + self.quantized_weight_bytes + self.row_kernel_bytes + packed_output_bytes(self.model)


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def _target_dtype(requested: str) -> mx.Dtype | None:
    if requested == "auto":
        return mx.float32 if on_cpu() else None
    if requested == "model":
        return None
    return getattr(mx, requested)


def load_mlx_lm(path: Path) -> tuple[nn.Module, dict]:
    """mlx-lm's model (lazy weights) and config, its errors as the engine's."""
    try:
        return load_model(path, lazy=True, get_model_classes=quantized_weights.model_classes(_get_classes))
    except ValueError as e:
        if "not supported" in str(e):
            raise UnsupportedModelError(f"{path}: {e}") from e
        raise ModelLoadError(f"cannot load model from {path}: {e}") from e
    except (FileNotFoundError, KeyError, OSError) as e:
        raise ModelLoadError(f"cannot load model from {path}: {type(e).__name__}: {e}") from e


def to_dtype(model: nn.Module, config: dict, dtype: str) -> nn.Module:
    """The model in plain float weights of the engine's dtype (see _target_dtype), evaluated:
    GGUF blocks and quantized layers dequantized (for forwards that do not go through
    the native quantized kernels: embedding and reranking models, engine/embed)."""
    gguf_blocks = bool(quantized_weights.gguf_tensors(config))
    if gguf_blocks:
        quantized_weights.unpack_blocks(model, config, mlx_quantized=not on_cpu())
    target = _target_dtype(dtype)
    if target is not None:
        if gguf_blocks or "quantization" in config or "quantization_config" in config:
            model = dequantize_model(model)
        model.update(tree_map(
            lambda p: p.astype(target) if mx.issubdtype(p.dtype, mx.floating) else p,
            model.parameters()))
    mx.eval(model.parameters())
    return model


# Generation models loaded in this process, by (directory, dtype), while their engine keeps
# them: a reranker or embedder over the same checkpoint (engine/embed) runs on these
# weights instead of loading a second copy. Weak: closing the engine frees the model.
_resident: "weakref.WeakValueDictionary[tuple[str, str], nn.Module]" = weakref.WeakValueDictionary()


def resident_model(path: Path, dtype: str) -> nn.Module | None:
    """The mlx-lm model an engine in this process already loaded from `path`, if any (not
    one whose weights stay quantized for the native kernels: those run decode only)."""
    model = _resident.get((str(Path(path).resolve()), dtype))
    return None if model is None or getattr(model, "_kernelext_quantized", False) else model


def load(path: Path, dtype: str = "auto", progress=None, group=None, layout: str = "tensor") -> LoadedModel:
    """`group`: an mx.distributed group to shard the weights across, in `layout`
    ("tensor" or "pipeline", distributed/sharding.py)."""
    model, config = load_mlx_lm(path)
    # The tokenizer first: parsing its JSON is the load's largest transient (hundreds of MB
    # for a 262k vocabulary), and once it is freed and handed back, the weights fill the
    # same pages instead of adding to the peak.
    tokenizer = load_tokenizer(path, config)
    release_freed_memory()
    if progress:
        progress("tokenizer")
    gguf_blocks = bool(quantized_weights.gguf_tensors(config))
    quantized = gguf_blocks or "quantization" in config or "quantization_config" in config
    quant_bytes = 0
    # mlx-lm's shard() splits nn.Linear and QuantizedLinear layers, not the native
    # kernels' repacked ones, so a sharded model leaves the quantized kernels out.
    if quantized and quant_linear.available() and group is None:
        # Quantized weights stay quantized, in the native kernels' layout (no float copy).
        quant_bytes = quantized_weights.repack_model(model, config, Path(path))
        model._kernelext_quantized = quant_bytes > 0  # plain attribute: not a parameter
        quant_linear.output_levels(output_projection(model))
        stacked_products.stack_siblings(model)
    elif gguf_blocks:
        quantized_weights.unpack_blocks(model, config, mlx_quantized=not on_cpu())
    target = _target_dtype(dtype)
    if target is not None:
        if quantized:
            # What the native kernels do not run: MLX's quantized CPU kernels are ~10x
            # slower than float32 GEMM with a fast BLAS.
            model = dequantize_model(model)
        model.update(tree_map(
            lambda p: p.astype(target) if mx.issubdtype(p.dtype, mx.floating) else p,
            model.parameters()))
    if group is not None:  # before eval: each rank materializes only its own slices
        from ..distributed.sharding import shard
        shard(model, config, group, layout)
    mx.eval(model.parameters())
    row_bytes = 0
    if on_cpu():
        _pretranspose_output(model)
        row_bytes = row_kernels.install(model) + _output_rows_bytes(model)
        if fused_layers.enabled():
            fused_layers.install(model)
    overlapped_layers.install(model)
    invariant = chunk_invariant(model)
    release_freed_memory()
    if progress:
        progress("weights")
    dtypes = {str(p.dtype).removeprefix("mlx.core.") for _, p in tree_flatten(model.parameters())
              if mx.issubdtype(p.dtype, mx.floating)}
    text_config = config.get("text_config", config)
    if group is None:  # a shard is no use to an embedder over the same checkpoint
        _resident[(str(Path(path).resolve()), dtype)] = model
    return LoadedModel(
        model=model, tokenizer=tokenizer, config=config, path=Path(path),
        dtype=",".join(sorted(dtypes)), quantized=quantized,
        max_context=int(text_config.get("max_position_embeddings") or 32768),
        vocab_size=int(text_config.get("vocab_size") or len(tokenizer.vocab)),
        row_kernel_bytes=row_bytes, quantized_weight_bytes=quant_bytes,
        parameter_bytes=sum(p.nbytes for _, p in tree_flatten(model.parameters())),
        chunk_invariant=invariant,
    )


def chunk_invariant(model) -> bool:
    """Make the model's attention exact per query where its weights run in the quantized
    kernels (models/row_attention.py); returns whether its forwards are then chunk-invariant.

    Every part of such a forward then computes a row from that row alone: products
    (cpu/quant_linear.py), norms, RoPE and activations (cpu/fused_layers.py), attention.
    Not with float weights (MKL's products depend on the row count), nor with recurrent
    layers (their state is not kept per block), nor without the native attention kernel.
    """
    if not getattr(model, "_kernelext_quantized", False):
        return False
    native = row_attention.install(model)
    return native and all(type(c) in (KVCache, RotatingKVCache) and not getattr(c, "keep", 0)
                          for c in make_prompt_cache(model))


# -- the output projection on the CPU --------------------------------------------------
# Logits are h @ W.T with W [vocab, hidden]. For the few rows of a decode batch or a
# verify window, MKL's GEMM with that transposed operand runs ~2x slower than with
# a contiguous W.T (measured on Gemma 3 270M: 8 rows 198 ms vs 105 ms, 5 rows 126 ms
# vs 78 ms), and the vocabulary projection dominates a small model's step. So on the
# CPU a contiguous copy of W.T is kept beside W (outside the parameters), and with
# the row kernels a blocked copy (engine/cpu/row_kernels.py), or else, with MKL, a packed
# copy for steps of 2 to 8 rows (engine/cpu/packed_gemm.py). The model runner switches
# these on around decode and verify forwards (`decode_products`): a packed product is
# computed eagerly, which prefill (whose logits are never evaluated) must not pay for.


class _Frozen:
    """Holds an array outside a module's parameters (not saved, cast or trained)."""

    def __init__(self, array: mx.array, packed=None, rows=None):
        self.array = array
        self.packed = packed
        self.rows = rows  # row_kernels.BlockedWeight
        self.eager = False  # set inside decode_products()

    def matmul(self, x: mx.array) -> mx.array:
        if self.rows is not None and row_kernels.active():
            return self.rows.matmul(x)
        # One row is as fast through MLX (MKL's gemv) and stays lazy.
        if self.eager and self.packed is not None and 1 < math.prod(x.shape[:-1]) <= MAX_ROWS:
            return self.packed.matmul(x)
        return x @ self.array


class _FastTiedEmbedding(nn.Embedding):
    def as_linear(self, x):
        return self._wt.matmul(x)


class _FastLinear(nn.Linear):
    def __call__(self, x):
        return self._wt.matmul(x)


def output_projection(model):
    """The module that turns hidden states into logits: lm_head, or the tied embedding."""
    lm = getattr(model, "language_model", model)
    head = getattr(lm, "lm_head", None)
    if head is None:
        head = getattr(getattr(lm, "model", None), "embed_tokens", None)
    return head


def _pretranspose_output(model) -> None:
    head = output_projection(model)
    fast = _FastLinear if isinstance(head, nn.Linear) else _FastTiedEmbedding
    if type(head) not in (nn.Linear, nn.Embedding) or "bias" in head:
        return  # quantized or biased projections keep mlx-lm's own code
    wt = mx.contiguous(head.weight.T)
    mx.eval(wt)
    if row_kernels.available() and wt.dtype == mx.float32:
        head._wt = _Frozen(wt, rows=row_kernels.BlockedWeight(head.weight))
    else:
        head._wt = _Frozen(wt, packed=PackedMatrix.build(wt))
    head.__class__ = fast


def _frozen_output(model) -> _Frozen | None:
    """The output projection's copies kept by _pretranspose_output (None: mlx-lm's own)."""
    return getattr(output_projection(model), "_wt", None)


def _output_rows_bytes(model) -> int:
    frozen = _frozen_output(model)
    return frozen.rows.array.nbytes if frozen is not None and frozen.rows is not None else 0


def packed_output_bytes(model) -> int:
    """RAM held by the packed copy of the output projection (0 when there is none)."""
    frozen = _frozen_output(model)
    return frozen.packed.buffer.nbytes if frozen is not None and frozen.packed is not None else 0


@contextlib.contextmanager
def decode_products(model):
    """Within (decode and verify forwards): the products use the row kernels where
    installed; else logits of 2 to 8 rows use the packed projection, evaluated at once.
    With quantized kernels, rows attend exactly per query (models/row_attention.py)."""
    frozen = _frozen_output(model)
    with row_kernels.decode_products(), row_attention.exact(model), overlapped_layers.overlapped():
        if frozen is None or frozen.packed is None:
            yield
            return
        frozen.eager = True
        try:
            yield
        finally:
            frozen.eager = False
