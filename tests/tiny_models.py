"""Tiny random-weight checkpoints, in the on-disk format of real Hugging Face
downloads, for every model family the engine supports.

Everything is generated locally and deterministically (fixed seeds, no network):

    path = write_tiny_model("qwen3_5", tmp_path, seed=0)   # any directory
    path = tiny_model("gemma3_text")                        # cached per process
    model, tokenizer = mlx_lm.load(str(path))

Each directory holds config.json, model.safetensors, generation_config.json,
tokenizer.json, tokenizer_config.json (with a `chat_template`) and
special_tokens_map.json. This module imports no MLX, so importing it never
loads `mlx.core` before the engine has picked its BLAS.

Tokenizer (all families): a byte-level BPE trained once per process on the
embedded English + Python corpus (`tokenizer_corpus()`): 8 special tokens
(ids 0-7: <|endoftext|> <|im_start|> <|im_end|> <bos> <eos> <start_of_turn>
<end_of_turn> <pad>), 256 byte tokens, 504 merges. Qwen's pre-tokenizer regex
and NFC normalisation; any text encodes, NFC text decodes back exactly.
  llama        bos <bos> (prepended), eos <|endoftext|>, ChatML template
  qwen3        no bos, eos <|im_end|>, ChatML template
  gemma3_text  bos <bos> (prepended), eos <eos>, <start_of_turn>role ... <end_of_turn>
  qwen3_5      as qwen3
generation_config.json lists both the family's eos and its end-of-turn token
(or <|endoftext|>) as eos_token_id, which mlx-lm adopts as stop tokens.

Families (hidden 64, vocab 768 = the tokenizer's size, float32 by default):
  llama        3 full-attention layers, GQA 4 q / 2 kv heads (head_dim 16),
               untied lm_head, tokenizer prepends <bos>.
  qwen3        3 full-attention layers, GQA 4/2, head_dim 32 (heads * head_dim
               != hidden), q/k RMSNorms, tied embeddings.
  gemma3_text  4 layers, sliding_window 8, sliding_window_pattern 3: layers
               [sliding, sliding, global, sliding], so any prompt over 8 tokens
               wraps the RotatingKVCache. GQA 4/1, q/k norms, pre/post norms
               around both branches, tied embeddings, tokenizer prepends <bos>.
  qwen3_5      the Qwen3.5 dense hybrid (mlx-lm model_type `qwen3_5`): 4 layers,
               full_attention_interval 2: [linear, full, linear, full].
               GatedDeltaNet layers (2 key / 4 value heads of dim 16, conv
               kernel 4); gated full attention (q_proj emits query and gate,
               4 q / 2 kv heads of dim 32, partial RoPE 0.25, q/k norms); dense
               SwiGLU MLPs; untied lm_head; plus a one-layer MTP head.
  qwen3_5 rather than qwen3_next: mlx-lm 0.32.2's qwen3_next.sanitize() returns
  the weights untouched unless the checkpoint has MoE experts (a dense
  checkpoint would keep its mtp.* keys and fail to load), whereas Qwen3.5 has
  real dense checkpoints with the same GatedDeltaNet hybrid and MTP head.

Weights are stored as the HF checkpoint stores them, so mlx-lm's sanitize()
does its real work. For qwen3_5 that means:
  * trunk keys under `model.language_model.` (sanitize renames them to
    `language_model.model.`), `lm_head.weight` at the top level; no vision tower;
  * `linear_attn.conv1d.weight` in torch layout [conv_dim, 1, kernel]
    (sanitize moves it to [conv_dim, kernel, 1]);
  * zero-centred RMSNorms: HF computes x_hat * (1 + w) and stores w. This holds
    for input_layernorm, post_attention_layernorm, self_attn.q_norm/k_norm and
    the final norm, and also for every mtp.* norm. sanitize() adds 1.0 to the
    trunk ones (it does so only when it sees an unconverted conv1d weight, as
    here). `linear_attn.norm.weight` (the gated norm) is a plain gain,
    x_hat * w, in HF and mlx-lm alike, so it is stored as the gain;
  * `mtp.*` keys, which sanitize() drops. The engine loads them itself:
      mtp.fc.weight                    [H, 2H]  applied to concat(e, h)
      mtp.pre_fc_norm_embedding.weight [H]      RMSNorm of e, zero-centred
      mtp.pre_fc_norm_hidden.weight    [H]      RMSNorm of h, zero-centred
      mtp.layers.0.input_layernorm.weight, .post_attention_layernorm.weight
      mtp.layers.0.self_attn.{q_proj [2*nh*hd, H], k_proj, v_proj, o_proj}.weight
      mtp.layers.0.self_attn.{q_norm, k_norm}.weight [hd]
      mtp.layers.0.mlp.{gate_proj, up_proj, down_proj}.weight
      mtp.norm.weight                  [H]      zero-centred, then lm_head
    (15 tensors, the set real Qwen3.5 dense checkpoints carry). Here
    e = embed_tokens(token t+1), h = the trunk's hidden state at position t,
    with the embedding half first, as in vLLM's Qwen3_5MultiTokenPredictor;
    embeddings and lm_head are shared with the trunk.
    config: text_config.mtp_num_hidden_layers = 1,
    mtp_use_dedicated_embeddings = false.
  gemma3_text norms are zero-centred too, in HF and in mlx-lm alike (stored w,
  gain 1 + w). llama and qwen3 norms are plain gains.

Weight scales (random normal, fixed seed), chosen so tests are meaningful:
  * logits have std ~LOGIT_STD = 8: the top-1/top-2 gap is typically 1-2
    logits, far above float32 reassociation noise (~5e-5 logits between
    prefill and incremental decoding), while sampling at temperature 1 still
    varies with the seed;
  * the special tokens (EOS, role markers, ...) get output rows 20x smaller, so
    their logits sit near 0 while the top logit is ~20: greedy decoding does
    not stop early and sampling very rarely does;
  * input embeddings are small (rms 0.1) next to the attention / MLP / GDN
    outputs (rms ~3), and attention is peaked (logit std ~4): the next token
    depends on the context, not just the current token, so cache bugs show,
    and greedy continuations do not fall into short loops;
  * with tied embeddings the final norm gain carries the output scale (10 for
    qwen3, 80 for gemma3_text, whose embeddings are also scaled by 1/sqrt(64)
    because the model multiplies them by sqrt(64));
  * GatedDeltaNet decay rates A = exp(A_log) lie in [0.02, 0.5], so the
    recurrent state remembers tens of tokens;
  * the MTP head is random like the rest: its drafts match the trunk's next
    token only by chance.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

FAMILIES = ("llama", "qwen3", "gemma3_text", "qwen3_5")

VOCAB_SIZE = 768
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<bos>",
    "<eos>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<pad>",
)
HIDDEN = 64
LOGIT_STD = 8.0
BRANCH_GAIN = 3.0
EMBED_RMS = 0.1
QK_GAIN = 2.0

_CORPUS = r'''
The quick brown fox jumps over the lazy dog. A small model is still a model:
it reads tokens, mixes them with attention, and writes a distribution over the
next token. Tests run it many times, so it must be fast, and they compare its
outputs exactly, so it must be deterministic.

Hello, world! How are you today? I am fine, thank you. The weather is nice and
the sun is shining. We went to the market to buy apples, bread, cheese and tea.
She said that the meeting would start at nine o'clock, but it began at ten.
Numbers like 0, 1, 2, 3, 42, 100, 2024 and 3.14159 appear in text and code.

A language model predicts the next word from the words that came before it.
The prompt is processed in one pass, then tokens are generated one at a time.
Each new token attends to every earlier token through the key-value cache.
Sliding window layers only look at the most recent tokens; global layers look
at all of them. Linear attention keeps a fixed-size recurrent state instead.
Batching many requests together makes better use of the hardware, and paged
caches let requests of different lengths share one pool of memory.

def greet(name: str) -> str:
    """Return a friendly greeting for the given name."""
    return f"Hello, {name}!"


class Counter:
    """Count how many times each item has been seen."""

    def __init__(self):
        self.counts = {}

    def add(self, item):
        self.counts[item] = self.counts.get(item, 0) + 1
        return self.counts[item]

    def most_common(self, n=3):
        items = sorted(self.counts.items(), key=lambda kv: kv[1], reverse=True)
        return items[:n]


def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        yield a
        a, b = b, a + b


if __name__ == "__main__":
    print(greet("world"))
    print(list(fibonacci(10)))
    counter = Counter()
    for word in "the cat sat on the mat with the hat".split():
        counter.add(word)
    print(counter.most_common())

import json
import os
from pathlib import Path

def load_config(path):
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)

def save_config(path, config):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)

for i in range(10):
    if i % 2 == 0:
        print(i, "is even")
    else:
        print(i, "is odd")

try:
    value = int(os.environ.get("COUNT", "5"))
except ValueError as error:
    raise SystemExit(f"bad COUNT: {error}")

The user asked a question and the assistant gave an answer. The system message
tells the assistant how to behave. Good answers are short, correct and kind.
What is the capital of France? The capital of France is Paris. What is two
plus two? Two plus two is four. Can you write a function that adds numbers?
Yes: def add(a, b): return a + b. Thank you very much! You are welcome.
Python lists, tuples, dictionaries and sets hold collections of values.
Strings can be joined, split, stripped, formatted and encoded as UTF-8 bytes.
Errors are raised with raise and handled with try, except, else and finally.
'''


def tokenizer_corpus() -> str:
    """The text the shared byte-level BPE tokenizer is trained on."""
    return _CORPUS


# Qwen2/3/3.5's pre-tokenizer split. transformers 5 loads model_type qwen3_5
# with Qwen3_5Tokenizer, which rebuilds the pipeline from vocab + merges with
# this regex and NFC, ignoring tokenizer.json's; using the same pipeline in
# tokenizer.json keeps `tokenizers` and transformers in agreement.
_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"""
    r"""| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


@functools.cache
def _trained_tokenizer() -> str:
    """Train the shared tokenizer once per process; returns its JSON."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    # Byte-level: every string encodes (no <unk>); NFC text decodes back exactly.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[AddedToken(t, special=True) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS], trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE, "corpus too small for VOCAB_SIZE merges"
    return tok.to_str()


_CHATML = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)
_GEMMA = (
    "{%- for message in messages %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] + '<end_of_turn>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{%- endif %}"
)

# Per family: bos (prepended by the tokenizer and the template, or None), eos,
# pad, chat template, and the ids generation stops on (generation_config).
_TOKENS = {
    "llama": ("<bos>", "<|endoftext|>", "<pad>", _CHATML, ("<|endoftext|>", "<|im_end|>")),
    "qwen3": (None, "<|im_end|>", "<|endoftext|>", _CHATML, ("<|im_end|>", "<|endoftext|>")),
    "gemma3_text": ("<bos>", "<eos>", "<pad>", _GEMMA, ("<eos>", "<end_of_turn>")),
    "qwen3_5": (None, "<|im_end|>", "<|endoftext|>", _CHATML, ("<|im_end|>", "<|endoftext|>")),
}


QWEN_STYLE_TOKENS = 151_643  # Qwen2/3's regular tokens; their configs pad the vocab to 151,936
QWEN_STYLE_VOCAB = 151_936


@functools.cache
def _qwen_style_tokenizer() -> str:
    """A byte-level BPE the size of Qwen's (151,643 merges-built tokens), for measuring
    what a real vocabulary costs (grammar masks, the sampler) on a tiny model.

    No Qwen tokenizer ships on this machine, so its token strings are grown from the
    default model's (Gemma 3's 262k SentencePiece pieces, a local package): each piece,
    as UTF-8 bytes, becomes a token once a split of it into two existing tokens exists,
    which gives a valid merges list. Shortest pieces first, as BPE training would.
    """
    from engine import resolve_model  # imports no MLX

    gemma = json.loads((Path(resolve_model("gemma-3-270m")) / "tokenizer.json").read_text())
    to_char = {b: c for b, c in zip(range(256), _byte_level_alphabet())}
    pieces = sorted((p for p in gemma["model"]["vocab"] if not p.startswith("<")),
                    key=lambda p: (len(p.encode()), p))
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for b in range(256):
        vocab.setdefault(to_char[b], len(vocab))
    merges = []
    for piece in pieces:
        if len(vocab) >= QWEN_STYLE_TOKENS:
            break
        token = "".join(to_char[b] for b in piece.replace("\u2581", " ").encode())
        if token in vocab or len(token) < 2:
            continue
        for k in range(len(token) - 1, 0, -1):
            if token[:k] in vocab and token[k:] in vocab:
                merges.append([token[:k], token[k:]])
                vocab[token] = len(vocab)
                break
    tok = json.loads(_trained_tokenizer())
    tok["model"]["vocab"], tok["model"]["merges"] = vocab, merges
    return json.dumps(tok)


def _byte_level_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table (byte-level BPE's token alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _token_id(token: str) -> int:
    return SPECIAL_TOKENS.index(token)  # the trainer puts special tokens first


def _write_tokenizer(family: str, path: Path, vocab: str = "small") -> None:
    bos, eos, pad, template, _ = _TOKENS[family]
    tok = Tokenizer.from_str(_qwen_style_tokenizer() if vocab == "qwen150k" else _trained_tokenizer())
    post = [processors.ByteLevel(trim_offsets=False)]
    if bos:
        post.append(
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, _token_id(bos))]
            )
        )
    tok.post_processor = processors.Sequence(post)
    tok.save(str(path / "tokenizer.json"))
    special = {"bos_token": bos, "eos_token": eos, "pad_token": pad}
    special = {k: v for k, v in special.items() if v}
    _write_json(path / "special_tokens_map.json", special)
    _write_json(
        path / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "add_bos_token": bool(bos),
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,  # keep decode(encode(s)) == s
            "model_max_length": 4096,
            "chat_template": ("{{- bos_token }}" if bos else "") + template,
        },
    )


# ----------------------------------------------------------------- weights ---


def _config(family: str) -> dict:
    bos, _, pad, _, stop = _TOKENS[family]
    ids = {
        "bos_token_id": _token_id(bos) if bos else None,
        "eos_token_id": [_token_id(t) for t in stop],
        "pad_token_id": _token_id(pad),
    }
    common = {
        "hidden_size": HIDDEN,
        "vocab_size": VOCAB_SIZE,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
    }
    if family == "llama":
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **common,
            "num_hidden_layers": 3,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "hidden_act": "silu",
            "rope_theta": 10000.0,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            **ids,
        }
    if family == "qwen3":
        return {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            **common,
            "num_hidden_layers": 3,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "hidden_act": "silu",
            "rope_theta": 1000000.0,
            "attention_bias": False,
            "tie_word_embeddings": True,
            **ids,
        }
    if family == "gemma3_text":
        layers, pattern = 4, 3
        return {
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            **common,
            "num_hidden_layers": layers,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": 16,
            "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0,
            "rope_scaling": None,
            "sliding_window": 8,
            "sliding_window_pattern": pattern,
            # mlx-lm reads sliding_window_pattern; transformers reads layer_types.
            "layer_types": [
                "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)
            ],
            "final_logit_softcapping": None,
            "attn_logit_softcapping": None,
            "tie_word_embeddings": True,
            **ids,
        }
    # qwen3_5
    layers, interval = 4, 2
    text = {
        "model_type": "qwen3_5_text",
        **common,
        "num_hidden_layers": layers,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "hidden_act": "silu",
        "attention_bias": False,
        "attn_output_gate": True,
        "full_attention_interval": interval,
        "layer_types": [
            "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers)
        ],
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "mamba_ssm_dtype": "float32",
        "partial_rotary_factor": 0.25,
        # mrope_section sums to rotary_dim / 2 = 32 * 0.25 / 2 (text-only: unused).
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
        },
        "mtp_num_hidden_layers": 1,
        "mtp_use_dedicated_embeddings": False,
        "tie_word_embeddings": False,
        **ids,
    }
    return {
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "model_type": "qwen3_5",
        "text_config": text,
        "tie_word_embeddings": False,
        **ids,
    }


class _Init:
    """Deterministic random tensors (float32 numpy), filled into `self.w`."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.w: dict[str, np.ndarray] = {}

    def normal(self, name: str, shape, std: float) -> np.ndarray:
        self.w[name] = (self.rng.standard_normal(shape) * std).astype(np.float32)
        return self.w[name]

    def linear(self, name: str, out_dim: int, in_dim: int, gain: float = 1.0) -> None:
        # Unit-variance outputs for unit-variance inputs, times `gain`.
        self.normal(name + ".weight", (out_dim, in_dim), gain / np.sqrt(in_dim))

    def norm(self, name: str, dim: int, zero_centred: bool, mean: float = 1.0) -> None:
        gain = mean * (1.0 + 0.1 * self.rng.standard_normal(dim).astype(np.float32))
        self.w[name + ".weight"] = gain - 1.0 if zero_centred else gain


def _attention(init: _Init, p: str, c: dict, *, qk_norm: bool, gated: bool, zc: bool) -> None:
    h, nh, nkv, hd = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    # q and k scaled by QK_GAIN (in the q/k norms where present, as those undo
    # any projection scale): attention logits of std ~QK_GAIN**2, so attention
    # is peaked rather than a running average of the whole context.
    qk_gain = 1.0 if qk_norm else QK_GAIN
    init.linear(p + "q_proj", nh * hd * (2 if gated else 1), h, gain=qk_gain)
    init.linear(p + "k_proj", nkv * hd, h, gain=qk_gain)
    init.linear(p + "v_proj", nkv * hd, h)
    init.linear(p + "o_proj", h, nh * hd, gain=BRANCH_GAIN)
    if qk_norm:
        init.norm(p + "q_norm", hd, zc, mean=QK_GAIN)
        init.norm(p + "k_norm", hd, zc, mean=QK_GAIN)


def _mlp(init: _Init, p: str, c: dict) -> None:
    h, i = c["hidden_size"], c["intermediate_size"]
    init.linear(p + "gate_proj", i, h)
    init.linear(p + "up_proj", i, h)
    init.linear(p + "down_proj", h, i, gain=BRANCH_GAIN)


def _gated_delta_net(init: _Init, p: str, c: dict) -> None:
    h, k = c["hidden_size"], c["linear_conv_kernel_dim"]
    key_dim = c["linear_num_key_heads"] * c["linear_key_head_dim"]
    value_dim = c["linear_num_value_heads"] * c["linear_value_head_dim"]
    nv = c["linear_num_value_heads"]
    init.linear(p + "in_proj_qkv", 2 * key_dim + value_dim, h)
    init.linear(p + "in_proj_z", value_dim, h)
    init.linear(p + "in_proj_b", nv, h)
    init.linear(p + "in_proj_a", nv, h)
    init.normal(p + "conv1d.weight", (2 * key_dim + value_dim, 1, k), 1 / np.sqrt(k))  # torch layout
    init.w[p + "dt_bias"] = np.ones(nv, np.float32)
    # Decay rates A in [0.02, 0.5]: the state remembers ~2-50 tokens, so a
    # wrong recurrent state changes the outputs (HF's init, up to 16, forgets
    # within a token or two).
    init.w[p + "A_log"] = np.log(init.rng.uniform(0.02, 0.5, nv)).astype(np.float32)
    init.norm(p + "norm", c["linear_value_head_dim"], zero_centred=False)
    init.linear(p + "out_proj", h, value_dim, gain=BRANCH_GAIN)


def _weights(family: str, c: dict, seed: int) -> dict[str, np.ndarray]:
    text = c.get("text_config", c)
    h, v = text["hidden_size"], text["vocab_size"]
    zc = family in ("gemma3_text", "qwen3_5")  # HF stores these norms as w, gain 1 + w
    tied = text["tie_word_embeddings"]
    prefix = "model.language_model." if family == "qwen3_5" else "model."
    init = _Init(seed)
    n_special = len(SPECIAL_TOKENS)
    gemma = family == "gemma3_text"

    # Small input embeddings next to branch outputs of rms ~BRANCH_GAIN: the
    # residual stream is mostly attention/MLP output, so the context (and any
    # cache bug) decides the next token, not just the current token.
    # Gemma multiplies its input embeddings by sqrt(h).
    embed_std = EMBED_RMS / (np.sqrt(h) if gemma else 1.0)
    embed = init.normal(prefix + "embed_tokens.weight", (v, h), embed_std)
    for i, kind in enumerate(text.get("layer_types") or ["full_attention"] * text["num_hidden_layers"]):
        p = f"{prefix}layers.{i}."
        init.norm(p + "input_layernorm", h, zc)
        # Gemma normalises each branch output (post_*_layernorm): its gain sets the branch scale.
        init.norm(p + "post_attention_layernorm", h, zc, mean=BRANCH_GAIN if gemma else 1.0)
        if kind == "linear_attention":
            _gated_delta_net(init, p + "linear_attn.", text)
        else:
            qk_norm, gated = family != "llama", family == "qwen3_5"
            _attention(init, p + "self_attn.", text, qk_norm=qk_norm, gated=gated, zc=zc)
        if gemma:
            init.norm(p + "pre_feedforward_layernorm", h, zc)
            init.norm(p + "post_feedforward_layernorm", h, zc, mean=BRANCH_GAIN)
        _mlp(init, p + "mlp.", text)

    # Logits = head @ (g * x_hat), x_hat of unit rms: a head of std s and final
    # norm gain g give logits of std s * g * sqrt(h); aim for LOGIT_STD. The
    # special tokens' rows are shrunk 20x so their logits stay near 0, far
    # below the top logit (~3 * LOGIT_STD).
    if tied:
        embed[:n_special] *= 0.05
        init.norm(prefix + "norm", h, zc, mean=LOGIT_STD / (embed_std * np.sqrt(h)))
    else:
        init.norm(prefix + "norm", h, zc)
        head = init.normal("lm_head.weight", (v, h), LOGIT_STD / np.sqrt(h))
        head[:n_special] *= 0.05

    if family == "qwen3_5":
        init.linear("mtp.fc", h, 2 * h)
        init.norm("mtp.pre_fc_norm_embedding", h, zero_centred=True)
        init.norm("mtp.pre_fc_norm_hidden", h, zero_centred=True)
        init.norm("mtp.layers.0.input_layernorm", h, zero_centred=True)
        init.norm("mtp.layers.0.post_attention_layernorm", h, zero_centred=True)
        _attention(init, "mtp.layers.0.self_attn.", text, qk_norm=True, gated=True, zc=True)
        _mlp(init, "mtp.layers.0.mlp.", text)
        init.norm("mtp.norm", h, zero_centred=True)
    return init.w


# ---------------------------------------------------------------- writing ---

_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def _tensor_bytes(a: np.ndarray, dtype: str) -> bytes:
    if dtype == "float32":
        return np.ascontiguousarray(a, "<f4").tobytes()
    if dtype == "float16":
        return np.ascontiguousarray(a, "<f2").tobytes()
    # bfloat16 = the top 16 bits of float32, rounded to nearest even.
    bits = np.ascontiguousarray(a, "<f4").view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2").tobytes()


def _save_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str) -> None:
    """Write a safetensors file (numpy has no bfloat16, so by hand)."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(tensors):
        blob = _tensor_bytes(tensors[name], dtype)
        header[name] = {
            "dtype": _DTYPES[dtype],
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        f.writelines(blobs)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tiny_model(family: str, path: str | Path, *, seed: int = 0, dtype: str = "float32",
                     vocab: str = "small", shape: dict | None = None) -> Path:
    """Write a tiny random checkpoint of `family` into directory `path`.

    vocab "small" is the 768-token BPE above; "qwen150k" a Qwen-sized byte-level BPE
    (151,643 tokens, config vocab 151,936; see _qwen_style_tokenizer). `shape` overrides
    config entries (hidden_size, num_hidden_layers, ...) for a larger random model of
    the same family, e.g. for a benchmark."""
    if vocab not in ("small", "qwen150k"):
        raise ValueError(f"vocab must be 'small' or 'qwen150k', not {vocab!r}")
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, not {dtype!r}")
    config = _config(family)
    config.get("text_config", config).update(shape or {})
    if vocab == "qwen150k":
        config.get("text_config", config)["vocab_size"] = QWEN_STYLE_VOCAB
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _write_json(path / "config.json", {**config, "torch_dtype": dtype})
    _save_safetensors(path / "model.safetensors", _weights(family, config, seed), dtype)
    _write_json(
        path / "generation_config.json",
        {
            "bos_token_id": config["bos_token_id"],
            "eos_token_id": config["eos_token_id"],
            "pad_token_id": config["pad_token_id"],
            "do_sample": False,
        },
    )
    _write_tokenizer(family, path, vocab)
    return path


@functools.cache
def _cache_dir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="kernelext-tiny-models-"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


@functools.cache
def tiny_model(family: str, *, seed: int = 0, dtype: str = "float32", vocab: str = "small") -> Path:
    """`write_tiny_model` into a per-process temp dir, written once per argument set."""
    return write_tiny_model(family, _cache_dir() / f"{family}-s{seed}-{dtype}-{vocab}", seed=seed,
                            dtype=dtype, vocab=vocab)
