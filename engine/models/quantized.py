"""Quantized checkpoints at load time: repack into the CPU kernels' layout, or dequantize.

Two kinds of checkpoint arrive here:
  * GGUF conversions (models/gguf_convert.py) keep each quantized matrix as its GGUF
    blocks, uint8 [rows, bytes per row], listed in config.json under
    `kernelext_gguf_quantization`. mlx-lm knows nothing of them, so `model_classes` gives
    those modules a uint8 placeholder of the blocks' shape first: mlx-lm's strict load
    still checks every other tensor.
  * mlx-lm affine checkpoints (QuantizedLinear / QuantizedEmbedding, 2 to 8 bits).

Where the quantized kernels run (engine/cpu/quant_linear.py), `repack_model` replaces
each such module by a QuantLinear / QuantEmbedding, one matrix at a time and a few
thousand rows at a time, so a load holds the packed model plus one matrix of blocks,
never float32 weights. Elsewhere (macOS, where MLX's quantized Metal kernels stay in
charge) GGUF blocks become mlx-lm quantized modules where a format holds them exactly;
on a CPU without the native build they are dequantized to float32 matrices, as the
converter used to write them.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..cpu import quant_layout, quant_linear
from .gguf_convert import QUANTIZATION_KEY


def gguf_tensors(config: dict) -> dict[str, list]:
    """{module path: [GGUF type, rows, columns]} of a converted GGUF's block tensors."""
    return {name.removesuffix(".weight"): spec for name, spec in config.get(QUANTIZATION_KEY, {}).items()}


def model_classes(get_classes):
    """Wrap mlx-lm's get_model_classes: a model built by it has uint8 placeholders, of the
    blocks' shape, for the weights stored as GGUF blocks."""

    def classes(config: dict):
        model_class, args_class = get_classes(config=config)
        blocks = gguf_tensors(config)
        if not blocks:
            return model_class, args_class

        def build(args):
            model = model_class(args)
            modules = dict(model.named_modules())
            for path, (qtype, rows, cols) in blocks.items():
                per, size = quant_layout.GGUF_BLOCKS[qtype]
                modules[path].weight = mx.zeros((rows, cols // per * size), mx.uint8)  # lazy: no memory
            return model

        return build, args_class

    return classes


def _affine_spec(module) -> tuple[int, int] | None:
    """(bits, group_size) of an mlx-lm affine module the kernels can run, else None."""
    if not isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return None
    if getattr(module, "mode", "affine") != "affine" or "biases" not in module:
        return None
    if not quant_layout.affine_supported(module.bits, module.group_size):
        return None
    return module.bits, module.group_size


def _host(a: mx.array) -> np.ndarray:
    mx.eval(a)
    return np.asarray(memoryview(a)) if a.dtype != mx.bfloat16 else np.array(a.astype(mx.float32))


class _BlockFiles:
    """Rows of the GGUF block tensors, read from the safetensors files a slice at a time
    with plain reads: mlx-lm's lazy arrays would load a whole matrix of blocks beside its
    packed form, and a memory map would count the pages read in the process's RSS."""

    def __init__(self, model_dir: Path):
        self.where = {}  # tensor name -> (file, offset of its data, bytes per row)
        for file in sorted(model_dir.glob("model*.safetensors")):
            with file.open("rb") as f:
                size = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(size))
            for name, info in header.items():
                if name != "__metadata__" and info["dtype"] == "U8":
                    self.where[name] = (file, 8 + size + info["data_offsets"][0], info["shape"][1])

    def unpack(self, path: str, qtype: str):
        file, offset, row_bytes = self.where[path + ".weight"]

        def rows(a, b):
            raw = np.fromfile(file, np.uint8, count=(b - a) * row_bytes, offset=offset + a * row_bytes)
            return quant_layout.unpack_gguf(raw.reshape(b - a, row_bytes), qtype)

        return rows


def _repacked(module, path: str, blocks: dict, files: _BlockFiles | None) -> quant_linear.QuantWeight | None:
    if path in blocks:
        qtype, rows, cols = blocks[path]
        return quant_linear.QuantWeight.repacked(rows, cols, files.unpack(path, qtype))
    spec = _affine_spec(module)
    if spec is None:
        return None
    bits, group = spec
    w, s, b = _host(module.weight), _host(module.scales), _host(module.biases)
    rows, cols = w.shape[0], w.shape[1] * 32 // bits
    # 16-bit scales and biases stay 16-bit in the packed layout (quant_layout.py)
    kinds = {mx.float16: "f16", mx.bfloat16: "bf16"}
    scales16 = kinds.get(module.scales.dtype) if module.biases.dtype == module.scales.dtype else None
    return quant_linear.QuantWeight.repacked(
        rows, cols, lambda a, c: quant_layout.unpack_mlx_affine(w[a:c], s[a:c], b[a:c], bits, group, scales16))


def _replace(model: nn.Module, modules: dict, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(modules[parent_path] if parent_path else model, name, new)


def repack_model(model: nn.Module, config: dict, model_dir: Path) -> int:
    """Replace every quantized matrix the kernels can run by its packed form; returns the
    bytes they hold."""
    blocks = gguf_tensors(config)
    files = _BlockFiles(model_dir) if blocks else None
    held = 0
    modules = dict(model.named_modules())
    for path in list(modules):  # paths only: a replaced module's arrays are freed at once
        module = modules[path]
        weight = _repacked(module, path, blocks, files)
        if weight is None:
            continue
        if isinstance(module, (nn.Embedding, nn.QuantizedEmbedding)):
            new = quant_linear.QuantEmbedding(weight)
        else:
            new = quant_linear.QuantLinear(weight, module["bias"] if "bias" in module else None)
        _replace(model, modules, path, new)
        modules[path] = module = new
        held += weight.nbytes
    return held


def _mlx_module(module, raw: np.ndarray, qtype: str, rows: int, cols: int, bits: int) -> nn.Module:
    """An mlx-lm QuantizedLinear / QuantizedEmbedding holding the blocks exactly."""
    weight, scales, biases = quant_layout.to_mlx_affine(quant_layout.unpack_gguf(raw, qtype), bits)
    if isinstance(module, nn.Embedding):
        new = nn.QuantizedEmbedding(rows, cols, group_size=32, bits=bits)
    else:
        new = nn.QuantizedLinear(cols, rows, bias="bias" in module, group_size=32, bits=bits)
        if "bias" in module:
            new.bias = module.bias
    # (the constructors' random weights are lazy: replaced before anything evaluates them)
    new.weight, new.scales, new.biases = mx.array(weight), mx.array(scales), mx.array(biases)
    return new


def unpack_blocks(model: nn.Module, config: dict, mlx_quantized: bool) -> None:
    """Where the native kernels do not run: GGUF blocks become mlx-lm quantized modules
    (`mlx_quantized`: a GPU, where MLX's own quantized kernels are fast; every type but
    Q6_K maps exactly) or float32 weights (the CPU, where MLX's float32 GEMM is faster
    than its quantized kernels). One matrix at a time."""
    import gguf

    modules = dict(model.named_modules())
    for path, (qtype, rows, cols) in gguf_tensors(config).items():
        module = modules[path]
        raw = _host(module.weight)
        bits = quant_layout.gguf_as_mlx_affine(qtype) if mlx_quantized else None
        if bits is not None:
            _replace(model, modules, path, _mlx_module(module, raw, qtype, rows, cols, bits))
        else:
            dense = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])
            module.weight = mx.array(dense.reshape(rows, cols))
