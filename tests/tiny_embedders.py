"""Tiny random-weight embedding and reranking checkpoints, laid out as the real ones
(the companion of tiny_models.py; no MLX imported here):

    write_tiny_bert(path)                      sentence-transformers BERT embedder
                                               (modules.json, 1_Pooling, 2_Normalize)
    write_tiny_bert(path, cross_encoder=True)  BertForSequenceClassification, 1 label
    write_tiny_decoder_embedder(path)          Qwen3-Embedding layout: a qwen3 causal LM
                                               with last-token pooling and a query prompt
    write_tiny_causal_reranker(path)           Qwen3-Reranker layout: a qwen3 causal LM
                                               whose vocabulary has "yes" and "no"

BERT: hidden 32, 2 layers, 4 heads, intermediate 64, a WordPiece vocabulary trained
on tiny_models' corpus (lower-cased, [PAD]=0 [UNK] [CLS] [SEP] [MASK]), the
[CLS] A [SEP] (B [SEP]) post-processor with token types, max_seq_length 64.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from tiny_models import _save_safetensors, _write_json, tokenizer_corpus, write_tiny_model

BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            vocab_size=512, max_position_embeddings=128, type_vocab_size=2)
MAX_SEQ_LENGTH = 64


def _bert_tokenizer(path: Path) -> None:
    (path / "tokenizer.json").write_text(_trained_wordpiece(), encoding="utf-8")
    _write_json(path / "tokenizer_config.json", {"tokenizer_class": "BertTokenizer", "do_lower_case": True})


@functools.cache
def _trained_wordpiece() -> str:
    """Trained once per process: the trainer breaks frequency ties in hash-map order, so two
    trainings may number the vocabulary differently."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator([tokenizer_corpus()], trainers.WordPieceTrainer(
        vocab_size=BERT["vocab_size"], special_tokens=specials, show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok.to_str()


def _bert_weights(rng, cross_encoder: bool) -> dict:
    c, w = BERT, {}
    h, inter = c["hidden_size"], c["intermediate_size"]
    prefix = "bert." if cross_encoder else ""

    def linear(name, out_dim, in_dim):
        w[f"{prefix}{name}.weight"] = (rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(np.float32)
        w[f"{prefix}{name}.bias"] = (0.02 * rng.standard_normal(out_dim)).astype(np.float32)

    def norm(name):
        w[f"{prefix}{name}.weight"] = (1 + 0.1 * rng.standard_normal(h)).astype(np.float32)
        w[f"{prefix}{name}.bias"] = (0.02 * rng.standard_normal(h)).astype(np.float32)

    for name, rows in (("word", c["vocab_size"]), ("position", c["max_position_embeddings"]),
                       ("token_type", c["type_vocab_size"])):
        w[f"{prefix}embeddings.{name}_embeddings.weight"] = rng.standard_normal((rows, h)).astype(np.float32)
    norm("embeddings.LayerNorm")
    for i in range(c["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for proj in ("query", "key", "value"):
            linear(p + "attention.self." + proj, h, h)
        linear(p + "attention.output.dense", h, h)
        norm(p + "attention.output.LayerNorm")
        linear(p + "intermediate.dense", inter, h)
        linear(p + "output.dense", h, inter)
        norm(p + "output.LayerNorm")
    linear("pooler.dense", h, h)
    if cross_encoder:
        w["classifier.weight"] = (rng.standard_normal((1, h)) * 2 / np.sqrt(h)).astype(np.float32)
        w["classifier.bias"] = np.zeros(1, np.float32)
    return w


def write_tiny_bert(path: str | Path, *, seed: int = 0, cross_encoder: bool = False,
                    pooling: str = "mean") -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    arch = "BertForSequenceClassification" if cross_encoder else "BertModel"
    config = {"architectures": [arch], "model_type": "bert", "hidden_act": "gelu",
              "layer_norm_eps": 1e-12, "pad_token_id": 0, **BERT}
    if cross_encoder:
        config["id2label"] = {"0": "LABEL_0"}
    _write_json(path / "config.json", config)
    _save_safetensors(path / "model.safetensors", _bert_weights(np.random.default_rng(seed), cross_encoder),
                      "float32")
    _bert_tokenizer(path)
    _write_json(path / "sentence_bert_config.json", {"max_seq_length": MAX_SEQ_LENGTH, "do_lower_case": False})
    if not cross_encoder:
        _sentence_transformers(path, pooling, normalize=True)
    return path


def _sentence_transformers(path: Path, pooling: str, normalize: bool, prompts: dict | None = None) -> None:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    _write_json(path / "modules.json", modules)
    (path / "1_Pooling").mkdir(exist_ok=True)
    keys = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens",
            "max": "pooling_mode_max_tokens", "lasttoken": "pooling_mode_lasttoken"}
    _write_json(path / "1_Pooling" / "config.json", {k: k == keys[pooling] for k in keys.values()})
    if prompts:
        _write_json(path / "config_sentence_transformers.json",
                    {"prompts": prompts, "default_prompt_name": None})


def write_tiny_decoder_embedder(path: str | Path, *, seed: int = 0) -> Path:
    path = write_tiny_model("qwen3", path, seed=seed)
    _sentence_transformers(path, "lasttoken", normalize=True,
                           prompts={"query": "Instruct: find the passage\nQuery:", "document": ""})
    return path


def write_tiny_causal_reranker(path: str | Path, *, seed: int = 0) -> Path:
    """Name the directory *reranker* (as Qwen3-Reranker's) so its task is detected.
    Two special tokens the qwen3 template never uses become the words "yes" and "no"."""
    path = write_tiny_model("qwen3", path, seed=seed)
    text = (path / "tokenizer.json").read_text(encoding="utf-8")
    text = text.replace('"<start_of_turn>"', '"yes"').replace('"<end_of_turn>"', '"no"')
    data = json.loads(text)
    for token in data["added_tokens"]:
        if token["content"] in ("yes", "no"):
            token["special"] = False
    (path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    return path
