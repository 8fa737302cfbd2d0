"""A random-weight model of Qwen3-1.7B's shape, to show that a real-size model fits and runs.

Two forms, both written once into build/bench/qwen3-1.7b-shape (git-ignored) and reused:
  - a GGUF: written in float16 (norms float32) with the `gguf` package, then quantized to
    Q4_K_M by the anchor build's own llama-quantize;
  - a 4-bit mlx-lm directory (group size 64, MLX's affine quantization).
The tokenizer is a byte-level BPE made up for the shape: 256 byte tokens, merges up to
151,643 regular tokens, then control tokens up to Qwen3's 151,936 rows. Random weights make
the text meaningless; the figures are memory and speed.

Then decode tok/s and peak RSS: llama-bench on the Q4_K_M GGUF, and kernelext on each form,
each in its own process.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

import measure

SHAPE = dict(hidden=2048, layers=28, heads=16, kv_heads=8, head_dim=128, ffn=6144, vocab=151936,
             regular_tokens=151643, context=40960, rope_theta=1000000.0, eps=1e-6)
EOS = "<|endoftext|>"


def _byte_alphabet() -> list[str]:
    from tokenizers.pre_tokenizers import ByteLevel

    return sorted(ByteLevel.alphabet())


def vocabulary() -> tuple[list[str], list[str], list[int]]:
    """(tokens, merges, token types): every regular token is reachable by its merges."""
    alphabet = _byte_alphabet()
    tokens, merges = list(alphabet), []
    pairs = ((a, b) for a in alphabet for b in alphabet)
    while len(tokens) < SHAPE["regular_tokens"]:
        try:
            a, b = next(pairs)
        except StopIteration:  # then three-symbol tokens: a two-symbol token and one more
            pairs = ((t, c) for t in tokens[256:256 + 65536] for c in alphabet)
            a, b = next(pairs)
        tokens.append(a + b)
        merges.append(f"{a} {b}")
    types = [1] * len(tokens)  # NORMAL
    specials = [EOS, "<|im_start|>", "<|im_end|>"]
    specials += [f"<|extra_{i}|>" for i in range(SHAPE["vocab"] - len(tokens) - len(specials))]
    tokens += specials
    types += [3] * len(specials)  # CONTROL
    return tokens, merges, types


def _weights(rng: np.random.Generator):
    """(name, array) of every tensor, in GGUF names, generated one at a time."""
    h, f, d = SHAPE["hidden"], SHAPE["ffn"], SHAPE["head_dim"]
    q, kv = SHAPE["heads"] * d, SHAPE["kv_heads"] * d

    def normal(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    yield "token_embd.weight", normal(SHAPE["vocab"], h)
    yield "output_norm.weight", np.ones(h, np.float32)
    for i in range(SHAPE["layers"]):
        p = f"blk.{i}."
        yield p + "attn_norm.weight", np.ones(h, np.float32)
        yield p + "attn_q.weight", normal(q, h)
        yield p + "attn_k.weight", normal(kv, h)
        yield p + "attn_v.weight", normal(kv, h)
        yield p + "attn_output.weight", normal(h, q)
        yield p + "attn_q_norm.weight", np.ones(d, np.float32)
        yield p + "attn_k_norm.weight", np.ones(d, np.float32)
        yield p + "ffn_norm.weight", np.ones(h, np.float32)
        yield p + "ffn_gate.weight", normal(f, h)
        yield p + "ffn_up.weight", normal(f, h)
        yield p + "ffn_down.weight", normal(h, f)


def write_gguf_f16(path: Path) -> None:
    import gguf

    tokens, merges, types = vocabulary()
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), "qwen3")
    w.add_name("random Qwen3-1.7B shape")
    w.add_context_length(SHAPE["context"])
    w.add_embedding_length(SHAPE["hidden"])
    w.add_block_count(SHAPE["layers"])
    w.add_feed_forward_length(SHAPE["ffn"])
    w.add_head_count(SHAPE["heads"])
    w.add_head_count_kv(SHAPE["kv_heads"])
    w.add_key_length(SHAPE["head_dim"])
    w.add_value_length(SHAPE["head_dim"])
    w.add_rope_freq_base(SHAPE["rope_theta"])
    w.add_layer_norm_rms_eps(SHAPE["eps"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    eos = tokens.index(EOS)
    w.add_eos_token_id(eos)
    w.add_bos_token_id(eos)
    w.add_pad_token_id(eos)
    w.add_add_bos_token(False)
    # Tensor infos first (shapes only), then the data streamed one tensor at a time.
    rng = np.random.default_rng(0)
    for name, a in _weights(np.random.default_rng(0)):
        w.add_tensor_info(name, a.shape, a.dtype, a.nbytes)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, a in _weights(rng):
        w.write_tensor_data(a)
    w.close()
    tmp.rename(path)


def write_mlx_4bit(path: Path) -> None:
    """An mlx-lm directory: config with `quantization`, 4-bit weights (MLX affine, group 64)."""
    import mlx.core as mx
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
             "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    tensors = {}
    for name, a in _weights(np.random.default_rng(1)):
        parts = name.split(".")
        if parts[0] == "blk":
            hf = f"model.layers.{parts[1]}.{names[parts[2]]}"
        else:
            hf = names[parts[0]]
        if a.ndim == 2:
            wq, scales, biases = mx.quantize(mx.array(a), group_size=64, bits=4)
            mx.eval(wq, scales, biases)
            tensors[hf + ".weight"], tensors[hf + ".scales"], tensors[hf + ".biases"] = wq, scales, biases
        else:
            tensors[hf + ".weight"] = mx.array(a)
    mx.save_safetensors(str(tmp / "model.safetensors"), tensors, metadata={"format": "mlx"})
    del tensors
    config = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"],
              "hidden_size": SHAPE["hidden"], "num_hidden_layers": SHAPE["layers"],
              "intermediate_size": SHAPE["ffn"], "num_attention_heads": SHAPE["heads"],
              "num_key_value_heads": SHAPE["kv_heads"], "head_dim": SHAPE["head_dim"],
              "rms_norm_eps": SHAPE["eps"], "vocab_size": SHAPE["vocab"],
              "max_position_embeddings": SHAPE["context"], "rope_theta": SHAPE["rope_theta"],
              "tie_word_embeddings": True, "torch_dtype": "float16",
              "quantization": {"group_size": 64, "bits": 4}}
    tokens, merges, types = vocabulary()
    eos = tokens.index(EOS)
    config.update(bos_token_id=eos, eos_token_id=eos)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    regular = {t: i for i, t in enumerate(tokens) if types[i] == 1}
    tok = Tokenizer(models.BPE(vocab=regular, merges=[tuple(m.split(" ")) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([t for t, k in zip(tokens, types) if k == 3])
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "pad_token": EOS,
        "add_bos_token": False, "model_max_length": SHAPE["context"]}))
    tmp.rename(path)


def ensure_models(cpp, work: Path, log=print) -> dict:
    """Paths of the forms that exist or could be made: {'gguf_q4_k_m': ..., 'mlx_4bit': ...}."""
    import llama_cpp_runs

    work.mkdir(parents=True, exist_ok=True)
    out = {}
    f16, q4 = work / "qwen3-1.7b-shape-f16.gguf", work / "qwen3-1.7b-shape-Q4_K_M.gguf"
    if cpp is not None and not q4.is_file():
        if not f16.is_file():
            t0 = time.perf_counter()
            write_gguf_f16(f16)
            log(f"wrote {f16.name} ({f16.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s")
        t0 = time.perf_counter()
        llama_cpp_runs.quantize(cpp, f16, q4)
        log(f"llama-quantize -> {q4.name} ({q4.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s")
        f16.unlink()  # 3.4 GB; the quantized file is what is measured
    if q4.is_file():
        out["gguf_q4_k_m"] = q4
    mlx_dir = work / "qwen3-1.7b-shape-mlx-4bit"
    if not mlx_dir.is_dir():
        t0 = time.perf_counter()
        write_mlx_4bit(mlx_dir)
        log(f"wrote {mlx_dir.name} in {time.perf_counter() - t0:.0f} s")
    out["mlx_4bit"] = mlx_dir
    return out


def kernelext_decode(model: Path, gen_tokens: int, dtype: str) -> dict:
    """Decode tok/s and peak RSS of kernelext on `model`, in a fresh process."""
    out = measure.run([sys.executable, "-c", _WORKER, str(model), str(gen_tokens), dtype],
                      timeout=1800)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["exit %d" % out.returncode])[-1],
                "peak_rss_mb": out.peak_rss_mb}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["peak_rss_mb"] = out.peak_rss_mb
    return result


_WORKER = r"""
import json, sys, time
sys.path.insert(0, %r)
from engine import Engine, EngineConfig, SamplingParams
model, gen, dtype = sys.argv[1], int(sys.argv[2]), sys.argv[3]
t0 = time.perf_counter()
with Engine.load(model, EngineConfig(prefix_cache=False, drafter="none", dtype=dtype, progress=False)) as eng:
    load_s = time.perf_counter() - t0
    u = eng.generate("Hello there", SamplingParams(max_tokens=gen)).usage
    print(json.dumps({"decode_tps": u.decode_tps, "load_s": load_s, "tokens": u.completion_tokens,
                      "weights": (f"{eng.metrics()['quantized_weight_bytes'] / 1e6:,.0f} MB kept quantized"
                                  if eng.metrics().get("quantized_weight_bytes") else eng.metrics().get("dtype"))}))
""" % str(Path(__file__).resolve().parent.parent)


def report(cpp, work: Path, gen_tokens: int, cpp_threads: int = 2) -> None:
    import llama_cpp_runs

    print(f"\n## Random-weight model of Qwen3-1.7B's shape ({SHAPE['layers']} layers, hidden "
          f"{SHAPE['hidden']}, vocab {SHAPE['vocab']:,}); decode of {gen_tokens} tokens", flush=True)
    try:
        models = ensure_models(cpp, work)
    except Exception as e:  # a failed write or quantization is reported, the bench goes on
        print(f"could not make the models: {type(e).__name__}: {e}")
        return
    print(f"{'':34} {'decode tok/s':>13} {'peak RSS MB':>12} {'vs llama.cpp':>20}")
    theirs = None
    if "gguf_q4_k_m" in models:
        try:
            theirs = llama_cpp_runs.llama_bench(cpp, models["gguf_q4_k_m"], 0, gen_tokens, cpp_threads)
            print(f"{f'llama.cpp, Q4_K_M GGUF, -t {cpp_threads}':34} {theirs.decode_tps:13.2f} {theirs.peak_rss_mb:12,.0f}")
        except Exception as e:
            print(f"llama.cpp on the Q4_K_M GGUF failed: {e}")
    else:
        print("llama.cpp: not available, so no Q4_K_M GGUF either (llama-quantize is part of the anchor)")
    rows = [("kernelext, 4-bit mlx-lm directory", models["mlx_4bit"], "auto")]
    if not quantized_loading():  # then dtype="model" runs MLX's own quantized kernels
        rows.append(("kernelext, 4-bit mlx-lm (MLX kernels)", models["mlx_4bit"], "model"))
    if "gguf_q4_k_m" in models:
        rows.append(("kernelext, Q4_K_M GGUF", models["gguf_q4_k_m"], "auto"))
    for label, path, dtype in rows:
        if not quantized_loading() and dtype == "auto":
            print(f"{label:34} not run: this engine dequantizes to float32 on the CPU "
                  f"(~{_float32_gb():.0f} GB plus kernel copies); quantized loading is not in yet")
            continue
        r = kernelext_decode(path, gen_tokens, dtype)
        if "error" in r:
            print(f"{label:34} failed: {r['error']} (peak RSS {r['peak_rss_mb']:,.0f} MB)")
            continue
        vs = ""
        if theirs is not None:
            vs = f"{r['decode_tps'] / theirs.decode_tps:.2f}x, {r['peak_rss_mb'] / theirs.peak_rss_mb:.2f}x RSS"
        print(f"{label:34} {r['decode_tps']:13.2f} {r['peak_rss_mb']:12,.0f} {vs:>20}  "
              f"(weights {r['weights']}, load {r['load_s']:.0f} s)")


def _float32_gb() -> float:
    h, f, d, layers = SHAPE["hidden"], SHAPE["ffn"], SHAPE["head_dim"], SHAPE["layers"]
    per_layer = h * SHAPE["heads"] * d * 2 + h * SHAPE["kv_heads"] * d * 2 + 3 * h * f
    return (SHAPE["vocab"] * h + layers * per_layer) * 4 / 1e9


def quantized_loading() -> bool:
    """Whether this engine keeps quantized weights quantized on the CPU (native kernels)."""
    try:
        from engine.cpu import quant_linear
    except ImportError:
        return False
    return bool(quant_linear.available())
