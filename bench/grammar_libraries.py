"""Which grammar library computes token masks fastest on real vocabularies?

Candidates (all on PyPI, Rust/C++ cores): llguidance, xgrammar, outlines-core. Each
compiles the same JSON Schema and regex against the default model's tokenizer
(Gemma 3, 262,144 tokens) and a Qwen-sized byte-level BPE on a tiny test model
(151,643 tokens, vocab 151,936; tests/tiny_models.py), then walks a valid output
token by token: the time to fill one row's next-token bitmask is what the engine
pays per constrained token (on a helper thread, overlapped with the forward), and
"request ms" (compile + every mask of the output) what one request with its own
schema costs.

The engine depends on the winner only (llguidance), so the others are not project
dependencies; install them beside it to rerun this comparison:

    pip install --target /tmp/grammar-libs --no-deps xgrammar apache-tvm-ffi outlines-core
    PYTHONPATH=$PWD:$PWD/tests:/tmp/grammar-libs python bench/grammar_libraries.py

xgrammar imports torch at module level for its tensor helpers; the matcher itself
fills any DLPack array, so a numpy bitmask is used and torch is stubbed when absent.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import types

import numpy as np

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.[a-z]{2,3}$"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "vip"]}},
        "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                     "zip": {"type": "string"}},
                    "required": ["city"], "additionalProperties": False},
    },
    "required": ["name", "age", "email", "tags", "address"],
    "additionalProperties": False,
}
DOC = {"name": "Ada Lovelace", "age": 36, "email": "ada@maths.uk", "tags": ["vip", "a"],
       "address": {"city": "London", "zip": "W1"}}
REGEX = r"\d{3}-\d{3}-\d{4} \((home|work|mobile)\)"
REGEX_TEXT = "555-123-4567 (mobile)"
# The same JSON text every library accepts: compact separators, the schema's key order.
JSON_TEXT = json.dumps(DOC, separators=(",", ":"))


def tokenizers():
    import engine  # first: it picks the BLAS before mlx loads
    from mlx_lm.utils import load_tokenizer
    from tiny_models import tiny_model

    gemma = load_tokenizer(engine.resolve_model("gemma-3-270m"))
    qwen = load_tokenizer(tiny_model("qwen3", vocab="qwen150k"))
    return {"gemma-3 262k": (gemma, 262_144), "qwen-style 151k": (qwen, 151_936)}


def walk(ids, fill, advance) -> list[float]:
    """Time fill() before each token of a valid output, then advance through it."""
    times = []
    for t in ids:
        start = time.perf_counter()
        allowed = fill()
        times.append(time.perf_counter() - start)
        assert allowed(t), f"token {t} rejected"
        advance(t)
    return times


def bit(mask: np.ndarray, t: int) -> bool:
    return bool((int(mask.view(np.uint32)[t >> 5]) >> (t & 31)) & 1)


def run_llguidance(tok, vocab, constraint, text):
    import llguidance
    import llguidance.hf
    import llguidance.numpy as lln

    start = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok._tokenizer, n_vocab=vocab)
    tok_s = time.perf_counter() - start
    kind, value = constraint
    start = time.perf_counter()
    grammar = llguidance.grammar_from(kind, value)
    matcher = llguidance.LLMatcher(lltok, grammar)
    assert not matcher.is_error(), matcher.get_error()
    compile_s = time.perf_counter() - start
    mask = lln.allocate_token_bitmask(1, vocab)
    ids = lltok.tokenize_str(text)

    def fill():
        lln.fill_next_token_bitmask(matcher, mask, 0)
        return lambda t: bit(mask[0], t)
    return tok_s, compile_s, walk(ids, fill, matcher.consume_token)


def run_xgrammar(tok, vocab, constraint, text):
    if "torch" not in sys.modules:
        try:
            import torch  # noqa: F401
        except ImportError:
            stub = types.ModuleType("torch")
            stub.int32, stub.Tensor = "int32", object
            stub.tensor = stub.full = lambda *a, **k: None
            sys.modules["torch"] = stub
    import xgrammar as xgr

    start = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok._tokenizer, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info)
    tok_s = time.perf_counter() - start
    kind, value = constraint
    start = time.perf_counter()
    compiled = (compiler.compile_json_schema(value, any_whitespace=False,
                                                                separators=(",", ":")) if kind == "json"
                else compiler.compile_regex(value))
    matcher = xgr.GrammarMatcher(compiled)
    compile_s = time.perf_counter() - start
    mask = np.full((1, (vocab + 31) // 32), -1, dtype=np.int32)
    ids = tok.encode(text, add_special_tokens=False)

    def fill():
        matcher.fill_next_token_bitmask(mask, 0)
        return lambda t: bit(mask[0], t)
    return tok_s, compile_s, walk(ids, fill, matcher.accept_token)


def run_outlines(tok, vocab, constraint, text):
    import llguidance.hf
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    start = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok._tokenizer, n_vocab=vocab)  # token bytes only
    eos = min(tok.eos_token_ids)
    table: dict = {}
    for t in range(len(tok._tokenizer)):
        if t != eos and not lltok.is_special_token(t):
            table.setdefault(lltok.decode_bytes([t]), []).append(t)
    table.pop(b"", None)
    voc = Vocabulary(eos, table)
    tok_s = time.perf_counter() - start
    kind, value = constraint
    regex = build_regex_from_schema(value) if kind == "json" else value
    start = time.perf_counter()
    guide = Guide(Index(regex, voc))
    compile_s = time.perf_counter() - start
    mask = np.full((1, (vocab + 31) // 32), -1, dtype=np.int32)
    ids = lltok.tokenize_str(text)

    def fill():
        guide.write_mask_into(mask.ctypes.data, mask.size, 4)
        return lambda t: bit(mask[0], t)
    return tok_s, compile_s, walk(ids, fill, guide.advance)


LIBRARIES = {"llguidance": run_llguidance, "xgrammar": run_xgrammar, "outlines-core": run_outlines}


def main() -> None:
    constraints = {"json-schema": (("json", json.dumps(SCHEMA)), JSON_TEXT),
                   "regex": (("regex", REGEX), REGEX_TEXT)}
    print(f"{'vocabulary':16} {'library':14} {'constraint':12} {'tokenizer s':>11} "
          f"{'compile ms':>10} {'mask us/token: median, mean, first':>34} {'request ms':>10}")
    for vname, (tok, vocab) in tokenizers().items():
        for lib, run in LIBRARIES.items():
            for cname, (constraint, text) in constraints.items():
                try:
                    tok_s, compile_s, times = run(tok, vocab, constraint, text)
                except Exception as e:  # a missing library or an unsupported feature
                    print(f"{vname:16} {lib:14} {cname:12} failed: {type(e).__name__}: {str(e)[:80]}")
                    continue
                us = [t * 1e6 for t in times]
                print(f"{vname:16} {lib:14} {cname:12} {tok_s:11.2f} {compile_s * 1e3:10.1f} "
                      f"{statistics.median(us):12.0f} {statistics.mean(us):10.0f} {us[0]:10.0f} "
                      f"{compile_s * 1e3 + sum(us) / 1e3:10.1f}   ({len(us)} tokens)", flush=True)


if __name__ == "__main__":
    main()
