"""Text -> token ids for pooling models, on the caller's thread (no MLX).

The model's own tokenizer.json through `tokenizers` (its Rust batch encoder
releases the GIL), with the model's special tokens, truncated to the model's
max_seq_length as sentence-transformers does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from ..errors import InvalidRequestError, ModelLoadError, UnsupportedModelError
from .model_kinds import PoolingSpec

# Qwen3-Reranker's prompt (its model card): the answer to this chat turn is "yes" or
# "no", and the relevance score is P(yes) from those two logits.
RERANK_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
RERANK_PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on "
                 "the Query and the Instruct provided. Note that the answer can only be \"yes\" or "
                 "\"no\".<|im_end|>\n<|im_start|>user\n")
RERANK_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


@dataclass
class Encoded:
    ids: list[int]
    types: list[int] | None = None  # BERT token type ids (0 = first text, 1 = second)


class PoolingTokenizer:
    def __init__(self, path: Path, spec: PoolingSpec):
        try:
            self.tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # tokenizers raises plain Exceptions
            raise ModelLoadError(f"cannot load {path / 'tokenizer.json'}: {e}") from e
        self.spec = spec
        self.tok.no_padding()
        # Two copies rather than toggling truncation on one: callers on any thread share them.
        self.whole = Tokenizer.from_str(self.tok.to_str())
        self.whole.no_truncation()
        self.tok.enable_truncation(spec.max_length)
        self.yes_no: tuple[int, int] | None = None
        if spec.task == "rerank" and spec.family == "decoder":
            ids = (self.tok.token_to_id("yes"), self.tok.token_to_id("no"))
            if None in ids:
                raise UnsupportedModelError(
                    f"{path}: a causal-LM reranker needs 'yes' and 'no' tokens in its vocabulary")
            self.yes_no = ids

    def count(self, text: str) -> int:
        return len(self.whole.encode(text, add_special_tokens=False).ids)

    def texts(self, texts: list[str], prompt: str = "") -> list[Encoded]:
        """Texts to embed (each after `prompt`, as sentence-transformers prepends it)."""
        return [Encoded(e.ids, e.type_ids) for e in self.tok.encode_batch([prompt + t for t in texts])]

    def pairs(self, query: str, documents: list[str], instruction: str | None = None) -> list[Encoded]:
        """(query, document) inputs of a reranker."""
        if self.spec.family == "encoder":  # [CLS] query [SEP] document [SEP], longest first truncated
            return [Encoded(e.ids, e.type_ids) for e in self.tok.encode_batch([(query, d) for d in documents])]
        # The prompt's frame must survive truncation: the document is cut instead.
        head = self.whole.encode(RERANK_PREFIX + f"<Instruct>: {instruction or RERANK_INSTRUCTION}\n"
                                 f"<Query>: {query}\n<Document>: ", add_special_tokens=False).ids
        tail = self.whole.encode(RERANK_SUFFIX, add_special_tokens=False).ids
        docs = self.whole.encode_batch(documents, add_special_tokens=False)
        room = self.spec.max_length - len(head) - len(tail)
        if room < 1:
            raise InvalidRequestError(f"the query is too long: the reranker takes {self.spec.max_length} tokens")
        return [Encoded(head + d.ids[:room] + tail) for d in docs]
