"""Tiny models that make tool calls: a tiny llama checkpoint (tests/tiny_models.py)
whose tokenizer selects one of mlx-lm's tool parsers, with the call's trigger made
likely so that seeded sampling starts calls of its own.

  marker_model(path, parser)   the parser's start/end markers are single added tokens
                               (ids 5 and 6, unused by llama's ChatML template; not
                               special, as Qwen's <tool_call>), the start marker's
                               output row scaled up
  json_model(path)             no markers (the JSON convention, like the default
                               model); the '{' token's output row a copy of
                               another token's, one this random model often
                               writes first after the prompt in question
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer

from tiny_models import write_tiny_model

START_ID, END_ID = 5, 6  # <start_of_turn>, <end_of_turn>: unused by the llama family


def _set_row(path: Path, token: int, row) -> None:
    weights = load_file(str(path / "model.safetensors"))
    head = weights["lm_head.weight"].copy()
    head[token] = row(head)
    weights["lm_head.weight"] = head
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})


def _edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj, ensure_ascii=False))


def marker_model(path, parser: str, factor: float = 60.0, seed: int = 0) -> Path:
    path = write_tiny_model("llama", path, seed=seed)
    mod = importlib.import_module(f"mlx_lm.tool_parsers.{parser}")
    names = {"<start_of_turn>": mod.tool_call_start, "<end_of_turn>": mod.tool_call_end}

    def tokenizer(tok):
        for t in tok["added_tokens"]:
            if t["content"] in names:
                t["content"], t["special"] = names[t["content"]], False
        vocab = tok["model"]["vocab"]
        for old, new in names.items():
            vocab[new] = vocab.pop(old)
    _edit_json(path / "tokenizer.json", tokenizer)
    _edit_json(path / "tokenizer_config.json", lambda c: c.update(tool_parser_type=parser))
    _set_row(path, START_ID, lambda head: head[START_ID] * factor)
    return path


def json_model(path, like: str = "(n", seed: int = 0) -> Path:
    path = write_tiny_model("llama", path, seed=seed)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    (brace,), (other,) = (tok.encode(t, add_special_tokens=False).ids for t in ("{", like))
    _set_row(path, brace, lambda head: head[other])
    return path
