"""How far kernelext's weights are from the float32-dequantized GGUF, on text that ships with
Python: perplexity of both, top-1 agreement, KL(reference || kernelext). llama.cpp's
llama-perplexity runs on the same file and the same GGUF.

The text is the language reference that ships with CPython (pydoc_data.topics, every topic in
sorted order), cut after ~CHUNKS x N_CTX tokens and written to a file both sides read.
Perplexity is computed as llama-perplexity computes it: chunks of N_CTX tokens, each starting
with BOS, only the second half of each chunk scored (every scored token has at least N_CTX/2
tokens of context).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

N_CTX = 512
CHUNKS = 40  # 40 x 512 = 20,480 tokens


def text_file(tokenizer, work: Path, chunks: int = CHUNKS) -> tuple[Path, list[int]]:
    """The fixed text, written to work/, and its tokens (with BOS) under kernelext's tokenizer."""
    from pydoc_data import topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    hf = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's wrapper around transformers'
    enc = hf.backend_tokenizer.encode(text)  # a fast tokenizer: ids with character offsets
    end_token = chunks * N_CTX + N_CTX // 4  # a little slack: llama.cpp's tokens may differ slightly
    if len(enc.ids) <= end_token:
        raise RuntimeError(f"pydoc_data.topics has only {len(enc.ids)} tokens")
    cut = enc.offsets[end_token][0]
    text = text[:cut]
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"pydoc_topics_{sys.version_info.major}{sys.version_info.minor}_{chunks}x{N_CTX}.txt"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return path, tokenizer.encode(text)


def reference_dir(model_dir: Path, work: Path) -> Path:
    """The engine's conversion of the GGUF with every tensor float32: blocks kept by the
    converter (config.json's `kernelext_gguf_quantization`) are dequantized by the `gguf`
    package's numpy kernels; a conversion that is float32 already is copied as is."""
    import shutil

    import gguf
    from safetensors.numpy import load_file, save_file

    out = work / f"reference-{model_dir.name}-f32"
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    config = json.loads((model_dir / "config.json").read_text())
    blocks = config.pop("kernelext_gguf_quantization", {})
    for file in sorted(model_dir.glob("model*.safetensors")):
        arrays = load_file(str(file))
        for name, (qtype, rows, cols) in blocks.items():
            if name in arrays:
                dense = gguf.quants.dequantize(arrays[name], gguf.GGMLQuantizationType[qtype])
                arrays[name] = np.ascontiguousarray(dense.reshape(rows, cols), dtype=np.float32)
        save_file(arrays, str(tmp / file.name), metadata={"format": "mlx"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(out)
    return out


def compare(model, reference, tokens: list[int], bos: int, kv_dtype=None) -> dict:
    """Perplexity of both models over the chunks, top-1 agreement and mean KL(ref || model).
    `model` attends through a KV cache of the engine's type (kv_dtype: float16, or None: the
    activations'), as the engine's prefill does. Runs on the MLX thread."""
    import mlx.core as mx

    n_chunks = len(tokens) // N_CTX
    first = N_CTX // 2
    nll = nll_ref = kl = agree = count = 0.0
    for i in range(n_chunks):
        ids = list(tokens[i * N_CTX:(i + 1) * N_CTX])
        ids[0] = bos
        targets = mx.array(ids[first + 1:])
        x = mx.array(ids)[None]
        logp = _log_softmax(_scored_logits(model, x, first, kv_dtype))
        logq = _log_softmax(_scored_logits(reference, x, first))
        rows = mx.arange(targets.size)
        step = [-logp[rows, targets].sum(), -logq[rows, targets].sum(),
                (mx.exp(logq) * (logq - logp)).sum(),
                (logp.argmax(-1) == logq.argmax(-1)).sum()]
        mx.eval(step)
        nll += step[0].item()
        nll_ref += step[1].item()
        kl += step[2].item()
        agree += step[3].item()
        count += targets.size
    return {"ppl": math.exp(nll / count), "ppl_ref": math.exp(nll_ref / count),
            "kl": kl / count, "top1": agree / count, "scored": int(count), "chunks": n_chunks}


def _scored_logits(model, x, first: int, kv_dtype=None):
    """Logits of positions first .. N_CTX-2 only: the trunk runs on the whole chunk, the
    output projection (262k wide on Gemma) only on the scored half. With kv_dtype, the
    chunk's keys and values go through a KV cache stored as that type first."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from engine.models import row_attention

    lm = getattr(model, "language_model", model)
    cache = make_prompt_cache(model) if kv_dtype is not None else None
    # the engine's attention where it has its own (else MLX's)
    with row_attention.exact(model), row_attention.storing_kv(kv_dtype):
        hidden = lm.model(x, cache=cache)[:, first:N_CTX - 1]
    if getattr(lm, "lm_head", None) is not None and not getattr(lm, "tie_word_embeddings", False):
        logits = lm.lm_head(hidden)
    else:
        logits = lm.model.embed_tokens.as_linear(hidden)
    return logits[0].astype(mx.float32)


def _log_softmax(x):
    import mlx.core as mx

    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def report(eng, gguf: Path, cpp, work: Path, chunks: int = CHUNKS, cpp_threads: int = 2) -> dict:
    from mlx_lm.utils import load_model

    import llama_cpp_runs

    path, tokens = text_file(eng.tokenizer, work, chunks)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    print(f"\n## Accuracy on {path.name} (CPython's pydoc_data.topics, {path.stat().st_size:,} bytes, "
          f"sha256 {digest}; {len(tokens):,} tokens; chunks of {N_CTX}, second halves scored)", flush=True)
    ref_dir = reference_dir(Path(eng.model_path), work)
    bos = tokens[0]

    def run():
        reference, _ = load_model(ref_dir)  # float32, MLX's own kernels
        return compare(eng._loaded.model, reference, tokens, bos, eng.core.runner.kv_dtype)

    t0 = time.perf_counter()
    r = eng.call(run)
    packed = eng.metrics().get("quantized_weight_bytes") or 0
    kind = "quantized, CPU kernels" if packed else eng.metrics().get("dtype")
    kind += f", KV {eng.metrics().get('kv_dtype')}"
    print(f"kernelext weights ({kind}) vs the float32-dequantized reference, "
          f"{r['scored']:,} scored tokens in {r['chunks']} chunks ({time.perf_counter() - t0:.0f} s):")
    ppl_change = r["ppl"] / r["ppl_ref"] - 1
    print(f"  perplexity      kernelext {r['ppl']:.4f}   reference {r['ppl_ref']:.4f}   "
          f"change {ppl_change:+.3%}  (target within 1%)")
    print(f"  top-1 agreement {r['top1']:.3%}  (target >= 98%)")
    print(f"  KL(reference || kernelext) {r['kl']:.6f} nats per token")
    if cpp is not None:
        lp = llama_cpp_runs.perplexity(cpp, gguf, path, N_CTX, cpp_threads)
        print(f"  llama-perplexity on the same file and GGUF: PPL {lp['ppl']:.4f} +/- {lp['ppl_err']:.4f} "
              f"({lp['chunks']} chunks; {lp['seconds']:.0f} s); kernelext / llama.cpp "
              f"{r['ppl'] / lp['ppl']:.4f}")
        r["llama_cpp"] = lp
    else:
        print("  llama-perplexity: not available (llama.cpp did not build)")
    return r
