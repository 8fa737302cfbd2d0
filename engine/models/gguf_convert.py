"""Convert a llama.cpp GGUF file into an mlx-lm model directory.

The output is an mlx-lm model directory: config.json, safetensors, a Hugging Face tokenizer rebuilt
from the GGUF metadata, generation_config.json, and a kernelext_conversion.json naming the source.
Tensors of the quantized types the engine runs natively (engine/cpu/quant_layout.py: Q4_0, Q5_0,
Q8_0, Q4_K, Q5_K, Q6_K) keep their GGUF blocks, as uint8 [rows, bytes per row], listed with their
type under config.json's `kernelext_gguf_quantization`; the engine's loader (models/quantized.py)
repacks or, where it cannot run them, dequantizes them. So the cache never holds a float32 copy of
a quantized tensor. Other tensors are dequantized to float32 with the `gguf` package's numpy
kernels; nothing here needs torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from ..cpu.memory import release_freed_memory
from ..cpu.quant_layout import GGUF_BLOCKS
from ..errors import ModelLoadError, UnsupportedModelError

# Bump whenever the output of a conversion changes: cached conversions of older versions are redone.
CONVERTER_VERSION = 4  # 3: compact tokenizer.json (_save_compact); 4: added tokens in tokenizer_config.json
_SHARD_BYTES = 2 * 1024**3
# GGUF architecture -> (mlx-lm model_type, HF architecture)
_ARCHITECTURES = {
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}
SUPPORTED_ARCHITECTURES = tuple(_ARCHITECTURES)
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma has norms before and after the MLP; llama-style models only the one before it, which HF
# calls post_attention_layernorm.
_FFN_NORM = {"gemma3": "pre_feedforward_layernorm"}

# The Gemma 3 chat template (text turns only). GGUFs of Gemma often carry no template at all.
_GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def gguf_digest(path: str | os.PathLike) -> str:
    """A sha256 over the file size, the first 8 MiB (header and metadata) and 64 KiB samples spread
    over the rest: it changes when the file does, without reading hundreds of MB on every load."""
    path, block = Path(path), 64 << 10
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(8 << 20))
        for offset in np.linspace(0, max(size - block, 0), 64, dtype=np.int64):
            f.seek(int(offset))
            digest.update(f.read(block))
    return digest.hexdigest()


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = True) -> None:
    """Write an mlx-lm model directory for `gguf_path` into `out_dir` (created if missing).

    Raises ModelLoadError for a file that is not a readable GGUF or has no tokenizer, and
    UnsupportedModelError for an architecture, tensor or tensor type this converter cannot map.
    """
    path, out = Path(gguf_path), Path(out_dir)
    with tqdm(total=1, desc=f"Reading {path.name}", disable=not progress) as bar:
        reader = _open(path)
        bar.update()
    meta = _Metadata(reader, path)
    arch = meta.need("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} of {path} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    tensors = {t.name: t for t in reader.tensors}
    names = {name: _hf_name(name, arch, path) for name in tensors if name != "rope_freqs.weight"}
    config = _model_config(meta, arch, tensors)
    tokenizer = _take_tokenizer_metadata(meta)  # fails before the slow part on a tokenizer-less file
    kept = {names[n]: [t.tensor_type.name, *_hf_shape(t)] for n, t in tensors.items() if n in names and _keeps_blocks(t)}
    if kept:
        config[QUANTIZATION_KEY] = kept

    out.mkdir(parents=True, exist_ok=True)
    # The tokenizer before the weights: its conversion is the largest transient (~300 MB of
    # Python objects for Gemma's 262k vocabulary), and done first it does not add to the
    # weights' pages that writing them makes resident. With its arrays taken out of the
    # reader (_take_tokenizer_metadata), converting the default model peaked at 509 MB of
    # RSS instead of 1,041.
    special = _write_tokenizer(tokenizer, meta, arch, config, out)
    del tokenizer
    release_freed_memory()
    _write_weights(tensors, names, arch, config, out, path, progress)
    config.update(special)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", special)
    _write_json(
        out / "kernelext_conversion.json",
        {"source": path.name, "digest": gguf_digest(path), "converter_version": CONVERTER_VERSION},
    )


class _Reader(gguf.GGUFReader):
    """GGUFReader, 3-4x faster on large vocabularies: it parses metadata by slicing its file
    mapping millions of times, and each slice of an np.memmap runs Python-level bookkeeping. A plain
    ndarray view of the same mapping (still memory-mapped, not read) has none."""

    @property
    def data(self) -> np.ndarray:
        return self._mapped

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._mapped = value.view(np.ndarray)


def _open(path: Path) -> gguf.GGUFReader:
    try:
        return _Reader(path)
    except Exception as e:  # the reader fails with ValueError/IndexError/OSError on damaged files
        raise ModelLoadError(f"{path} is not a readable GGUF file (truncated or not GGUF?): {e}") from e


class _Metadata:
    """GGUF key/value metadata, with errors that name the file."""

    def __init__(self, reader: gguf.GGUFReader, path: Path):
        self.fields, self.path = reader.fields, path

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def get(self, key: str, default=None):
        field = self.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as e:
            raise ModelLoadError(f"cannot read metadata {key!r} of {self.path}: {e}") from e

    def need(self, key: str):
        if key not in self.fields:
            raise ModelLoadError(f"{self.path} lacks the metadata {key!r}")
        return self.get(key)


QUANTIZATION_KEY = "kernelext_gguf_quantization"  # config.json: {hf name: [type, rows, columns]}


def _keeps_blocks(tensor) -> bool:
    """Whether a tensor is stored as its GGUF blocks (a quantized matrix the engine runs)."""
    return tensor.tensor_type.name in GGUF_BLOCKS and len(tensor.shape) == 2


def _hf_shape(tensor) -> list[int]:
    return [int(d) for d in reversed(tensor.shape)]  # GGUF lists dimensions innermost first


def _stored_bytes(tensor) -> int:
    return int(tensor.n_bytes) if _keeps_blocks(tensor) else int(tensor.n_elements) * 4


def _hf_name(name: str, arch: str, path: Path) -> str:
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if match:
        layer, part, kind = match.groups()
        if part == "ffn_norm":
            target = _FFN_NORM.get(arch, "post_attention_layernorm")
        else:
            target = _LAYER_TENSORS.get(part)
        if target is not None:
            return f"model.layers.{layer}.{target}.{kind}"
    else:
        base, _, kind = name.rpartition(".")
        if base in _GLOBAL_TENSORS:
            return f"{_GLOBAL_TENSORS[base]}.{kind}"
    raise UnsupportedModelError(f"tensor {name!r} of {path} has no mlx-lm equivalent for architecture {arch!r}")


def _model_config(meta: _Metadata, arch: str, tensors: dict) -> dict:
    p = arch + "."
    heads = meta.need(p + "attention.head_count")
    hidden = meta.need(p + "embedding_length")
    layers = meta.need(p + "block_count")
    head_dim = meta.get(p + "attention.key_length", hidden // heads)
    rope_theta = _round(meta.get(p + "rope.freq_base", 10000.0))
    if "token_embd.weight" not in tensors:
        raise ModelLoadError(f"{meta.path} has no token_embd.weight tensor")
    config = {
        "architectures": [_ARCHITECTURES[arch][1]],
        "model_type": _ARCHITECTURES[arch][0],
        "hidden_size": hidden,
        "intermediate_size": meta.need(p + "feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get(p + "attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": _round(meta.need(p + "attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,
        "max_position_embeddings": meta.need(p + "context_length"),
        "vocab_size": int(tensors["token_embd.weight"].shape[-1]),  # GGUF shapes are reversed: [dim, vocab]
        "tie_word_embeddings": "output.weight" not in tensors,
        "rope_scaling": _rope_scaling(meta, arch, tensors, rope_theta, head_dim),
        "torch_dtype": "float32",
    }
    if arch == "gemma3":
        # llama.cpp hard-codes these for Gemma 3 rather than storing them; so do we.
        config.update(
            sliding_window=meta.need(p + "attention.sliding_window"),
            sliding_window_pattern=6,
            rope_local_base_freq=_round(meta.get(p + "rope.freq_base_swa", 10000.0)),
            # Gemma 3 27B (62 layers) scales queries by hidden/heads, all other sizes by head_dim.
            query_pre_attn_scalar=hidden // heads if layers == 62 else head_dim,
            hidden_activation="gelu_pytorch_tanh",
        )
    elif arch == "llama":
        config.update(attention_bias="blk.0.attn_q.bias" in tensors, mlp_bias="blk.0.ffn_up.bias" in tensors)
    return config


def _rope_scaling(meta: _Metadata, arch: str, tensors: dict, base: float, head_dim: int):
    if "rope_freqs.weight" in tensors:
        return _llama3_rope_scaling(tensors["rope_freqs.weight"], base, head_dim, meta.path)
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind == "none" or factor in (None, 1.0):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        return {
            "rope_type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": meta.need(f"{arch}.rope.scaling.original_context_length"),
        }
    raise UnsupportedModelError(f"rope scaling {kind!r} of {meta.path} is not supported")


def _llama3_rope_scaling(tensor, base: float, dims: int, path: Path) -> dict:
    """llama.cpp keeps Llama 3.1-style rope scaling only as per-frequency factors (rope_freqs).
    Recover the HF parameters: Meta's models all use low=1, high=4 and an original context of 8192;
    check that they reproduce the stored factors rather than trusting it."""
    factors = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float64).ravel()
    scaling = {
        "rope_type": "llama3",
        "factor": float(factors.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    wavelen = 2 * math.pi * base ** (np.arange(0, dims, 2) / dims)
    smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
    expected = np.where(
        wavelen < 8192 / 4.0,
        1.0,
        np.where(wavelen > 8192, scaling["factor"], 1 / ((1 - smooth) / scaling["factor"] + smooth)),
    )
    if factors.shape != expected.shape or not np.allclose(factors, expected, rtol=1e-3):
        raise UnsupportedModelError(f"the rope_freqs tensor of {path} matches no Llama 3 rope scaling")
    return scaling


def _round(value: float) -> float:
    """GGUF stores floats as float32; 9.99999997e-07 is meant as 1e-06."""
    return float(f"{value:.7g}")


def _write_weights(
    tensors: dict, names: dict, arch: str, config: dict, out: Path, path: Path, progress: bool
) -> None:
    # Plan shards from the tensor sizes first, so only one shard is ever held in memory.
    shards, size = [[]], 0
    for name in names:
        nbytes = _stored_bytes(tensors[name])
        if shards[-1] and size + nbytes > _SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    weight_map = {}
    with tqdm(total=len(names), desc="Converting tensors", unit="tensor", disable=not progress) as bar:
        for shard, filename in zip(shards, files):
            arrays = {}
            for name in shard:
                arrays[names[name]] = _tensor(tensors[name], arch, config, path)
                weight_map[names[name]] = filename
                bar.update()
            save_file(arrays, str(out / filename), metadata={"format": "mlx"})
            del arrays
    if len(files) > 1:
        total = sum(_stored_bytes(tensors[name]) for name in names)
        _write_json(
            out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
        )


def _tensor(tensor, arch: str, config: dict, path: Path) -> np.ndarray:
    name, qtype = tensor.name, tensor.tensor_type
    if _keeps_blocks(tensor):
        # Rows of blocks: [out, bytes per row]. Blocks run along the input dimension, so
        # permuting output rows (llama's q/k) moves whole rows of blocks.
        blocks = np.asarray(tensor.data, dtype=np.uint8).reshape(_hf_shape(tensor)[0], -1)
        if arch == "llama" and name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = config["num_attention_heads"] if ".attn_q." in name else config["num_key_value_heads"]
            blocks = _undo_rope_permute(blocks, heads)
        return np.ascontiguousarray(blocks)
    try:
        array = gguf.quants.dequantize(tensor.data, qtype)
    except NotImplementedError as e:
        raise UnsupportedModelError(
            f"tensor {name!r} of {path} has type {qtype.name}, which cannot be dequantized"
        ) from e
    except Exception as e:
        raise ModelLoadError(f"cannot read tensor {name!r} ({qtype.name}) of {path}: {e}") from e
    # GGUF lists dimensions innermost first; HF/mlx-lm want [out, in].
    array = array.reshape([int(d) for d in reversed(tensor.shape)])
    if arch == "gemma3" and name.endswith("norm.weight"):
        # llama.cpp stores Gemma's RMSNorm scale as 1 + w; mlx-lm's gemma3_text adds the 1 itself.
        array = array - 1.0
    elif arch == "llama" and name.split(".")[-2] in ("attn_q", "attn_k"):
        heads = config["num_attention_heads"] if ".attn_q." in name else config["num_key_value_heads"]
        array = _undo_rope_permute(array, heads)
    return np.ascontiguousarray(array, dtype=np.float32)


def _undo_rope_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp interleaves each head's q/k rows for its llama rope (pairs of adjacent dims); put
    them back in HF's rotate-half order (first half, second half) that mlx-lm's llama expects."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _take_tokenizer_metadata(meta: _Metadata) -> dict:
    """The tokenizer's metadata as Python values, its arrays taken out of the reader: gguf's
    reader keeps every element of an array field as numpy views of its own (293 MB for the
    default model's 262k tokens, scores and token types), which the lists returned replace."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING

    if "tokenizer.ggml.tokens" not in meta:
        raise ModelLoadError(f"{meta.path} has no tokenizer (no tokenizer.ggml.tokens metadata)")
    keys = {f"tokenizer.{key}": name for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
            if f"tokenizer.{key}" in meta}
    values = {name: meta.get(key) for key, name in keys.items()}
    for key, name in keys.items():
        if isinstance(values[name], list):
            del meta.fields[key]
    return values


def _write_tokenizer(tok: dict, meta: _Metadata, arch: str, config: dict, out: Path) -> dict:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json; return the special
    token ids for config.json / generation_config.json."""
    from tokenizers import processors
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    try:
        backend, _ = convert_gguf_tokenizer(arch, tok)
    except Exception as e:
        raise UnsupportedModelError(f"cannot build the tokenizer of {meta.path}: {e}") from e
    tokens = tok["tokens"]
    ids = {name: tok.get(f"{name}_id") for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
    strings = {name: tokens[i] if i is not None else None for name, i in ids.items()}
    # llama.cpp adds BOS to sentencepiece vocabularies unless the file says otherwise.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", tok.get("tokenizer_type") == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    add_bos, add_eos = add_bos and ids["bos_token"] is not None, add_eos and ids["eos_token"] is not None
    # Put BOS/EOS handling into tokenizer.json itself so that every loader agrees.
    prefix = [(strings["bos_token"], ids["bos_token"])] if add_bos else []
    suffix = [(strings["eos_token"], ids["eos_token"])] if add_eos else []
    backend.post_processor = processors.TemplateProcessing(
        single=[f"{t}:0" for t, _ in prefix] + ["$A:0"] + [f"{t}:0" for t, _ in suffix],
        special_tokens=prefix + suffix,
    )
    _save_compact(backend, out / "tokenizer.json")

    chat_template = meta.get("tokenizer.chat_template") or (_GEMMA_CHAT_TEMPLATE if arch == "gemma3" else None)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **strings,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    if chat_template:
        tokenizer_config["chat_template"] = chat_template
    tokenizer_config["added_tokens_decoder"] = _added_tokens_decoder(backend)
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    _write_json(out / "special_tokens_map.json", {k: v for k, v in strings.items() if v is not None})

    # Chat turns end with an end-of-turn token that differs from EOS; stop on both.
    eos_ids = [ids["eos_token"], meta.get("tokenizer.ggml.eot_token_id"), meta.get("tokenizer.ggml.eom_token_id")]
    if arch == "gemma3" and "<end_of_turn>" in tokens:
        eos_ids.append(tokens.index("<end_of_turn>"))
    eos_ids = list(dict.fromkeys(i for i in eos_ids if i is not None))
    return {"bos_token_id": ids["bos_token"], "eos_token_id": eos_ids, "pad_token_id": ids["pad_token"]}


def _added_tokens_decoder(backend) -> dict:
    """tokenizer.json's added tokens, as transformers' save_pretrained writes them into
    tokenizer_config.json. Without them there, transformers reads them from tokenizer.json
    by parsing the whole file in Python and holds that (87 MB for Gemma's vocabulary) while
    the Rust tokenizer loads: the tokenizer's load peaked 97 MB higher."""
    return {
        str(i): {"content": t.content, "single_word": t.single_word, "lstrip": t.lstrip,
                 "rstrip": t.rstrip, "normalized": t.normalized, "special": t.special}
        for i, t in sorted(backend.get_added_tokens_decoder().items())
    }


def _save_compact(backend, path: Path) -> None:
    """tokenizer.json with BPE merges as "a b" strings (the format tokenizers also reads)
    and UTF-8 text unescaped: the same tokenizer in 13 MB instead of 33 for Gemma's 262k
    vocabulary and 515k merges. Every loader parses the whole file (mlx-lm's load in
    Python, then tokenizers in Rust), and a merge as a two-string list costs ~3x the
    memory of one string: loading the default model's tokenizer peaked at 713 MB above
    the process's size, and at 364 MB from this file (bench/bench_llama_cpp.py's RSS row).
    A merge whose halves contain a space cannot be written so; then the lists stay."""
    data = json.loads(backend.to_str())
    model = data.get("model", {})
    merges = model.get("merges") or []
    if merges and all(isinstance(m, list) and len(m) == 2 and " " not in m[0] + m[1] for m in merges):
        model["merges"] = [f"{a} {b}" for a, b in merges]
    path.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
