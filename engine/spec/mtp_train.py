"""Give any model an MTP draft head: self-distillation on a local text corpus.

The head at position i reads the trunk's final hidden state h_i and the token
t_{i+1}, and learns the trunk's own distribution for t_{i+2}: the trunk's logits
at i+1 (mtp_head.py describes the head). Only the head trains; the embeddings and
the output projection stay the trunk's, shared and frozen.

What makes it fit in a coffee break on a CPU:
  * The trunk runs once over the corpus and its final hidden states are cached
    (float16). They are the head's inputs and also its targets: the trunk's
    logits at i+1 are lm_head(h_{i+1}), so caching h_{i+1} caches the target
    distribution exactly, in D numbers per token instead of a top-k list.
  * The head's softmax and the targets are restricted to a draft vocabulary, the
    K most frequent tokens of the corpus: each step multiplies by K rows of the
    output projection instead of all V (262k for Gemma 3). Drafting gets the same
    saving, which is why the draft vocabulary is saved with the head.
  * The head's output state also regresses onto h_{i+1}: at depth > 1 the drafter
    chains it in place of that state, so the closer it is, the better later
    draft positions do (as in EAGLE).

Every MLX call runs on the engine's thread (engine.call), one trunk chunk or one
optimizer step at a time: requests are still served in between, and Ctrl-C
stops training at a step boundary after saving a checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import os
import random
import struct
import sysconfig
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from tqdm.auto import tqdm

from ..errors import InvalidRequestError
from .mtp_head import LOCAL_HEAD, MTPHead, trunk_forward, trunk_hidden

PIECE_CHARS = 6000  # corpus pieces: small, so a sample of the corpus spans many files
TRUNK_CHUNK_TOKENS = 512  # tokens per trunk forward while caching
CHECKPOINT_S = 60.0  # seconds between checkpoints
_STATE_KEY = "kernelext_mtp_train"


@dataclass
class TrainResult:
    path: Path  # the head file
    steps: int  # optimizer steps done in all, resumed ones included
    losses: list[float]  # per step: KL(trunk || head) over the draft vocabulary
    agreements: list[float]  # per step: head top-1 == trunk top-1 on the batch (draft vocabulary)
    agreement: float  # held-out: head top-1 == trunk top-1 over the full vocabulary
    vocab_coverage: float  # held-out: share of the trunk's top-1 tokens in the draft vocabulary
    tokens: int  # training positions per epoch
    tokens_per_s: float  # training positions per second of this call's optimizer steps
    draft_vocab_size: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase


# ------------------------------------------------------------------ corpus ---

def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):  # binary or unreadable: not text to train on
        return ""


def _pieces(text: str) -> list[str]:
    """Cut text at line ends into pieces of about PIECE_CHARS characters."""
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + PIECE_CHARS)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def _shuffled(items: list, seed: int) -> list:
    random.Random(seed).shuffle(items)
    return items


def default_corpus(seed: int = 0) -> list[str]:
    """The Python standard library on this machine, in a fixed order: pieces of its
    modules' source alternating with pieces of pydoc's reference topics (prose), so
    the head sees both code and English."""
    from pydoc_data.topics import topics

    stdlib = Path(sysconfig.get_path("stdlib"))
    skip = {"site-packages", "test", "tests", "idle_test", "encodings", "__pycache__"}
    files = sorted(p for p in stdlib.rglob("*.py") if not skip & set(p.relative_to(stdlib).parts))
    code = _shuffled([piece for f in files for piece in _pieces(_read(f))], seed)
    prose = _shuffled([piece for _, text in sorted(topics.items()) for piece in _pieces(text)], seed)
    return [p for pair in itertools.zip_longest(code, prose) for p in pair if p]


def corpus_pieces(corpus=None, seed: int = 0) -> list[str]:
    """Text pieces to train on, in a fixed order: the default corpus, or a file, or every
    readable text file under a directory (hidden ones skipped)."""
    if corpus is None:
        return default_corpus(seed)
    root = Path(corpus).expanduser()
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
    else:
        raise InvalidRequestError(f"corpus {root} does not exist")
    pieces = _shuffled([piece for f in files for piece in _pieces(_read(f))], seed)
    if not pieces:
        raise InvalidRequestError(f"corpus {root} has no UTF-8 text")
    return pieces


def token_windows(tokenizer, pieces: list[str], n_windows: int, seq_len: int) -> np.ndarray:
    """[n, seq_len] token ids (n <= n_windows): the pieces' tokens back to back, cut into
    windows that each start like a prompt does (with the tokenizer's BOS, if it adds one)."""
    bos = tokenizer.bos_token_id
    prefix = [bos] if bos is not None and tokenizer.encode("x")[:1] == [bos] else []
    body = seq_len - len(prefix)
    stream: list[int] = []
    for piece in pieces:
        if len(stream) >= n_windows * body:
            break
        stream += tokenizer.encode(piece + "\n\n", add_special_tokens=False)
    n = min(n_windows, len(stream) // body)
    rows = np.array(stream[:n * body], dtype=np.int32).reshape(n, body)
    return np.concatenate([np.full((n, len(prefix)), bos, np.int32), rows], axis=1)


def draft_vocabulary(windows: np.ndarray, size: int, vocab_size: int) -> np.ndarray:
    """The `size` most frequent token ids of the windows (ties, unseen ids included: lower
    id first), sorted."""
    counts = np.bincount(windows.ravel(), minlength=vocab_size)
    return np.sort(np.argsort(-counts, kind="stable")[:size]).astype(np.int32)


# ------------------------------------------------------------------- training ---

def _loss(head: MTPHead, hidden, next_tokens, target, reg_weight: float):
    """hidden: trunk states h_i, next_tokens: t_{i+1}, target: h_{i+1} (the trunk's
    logits at i+1 are computed from it) -> (objective, KL, top-1 agreement)."""
    out = head.hidden_out(hidden, next_tokens)
    logq = nn.log_softmax(head.draft_logits(out), axis=-1)
    logp = nn.log_softmax(head.draft_logits(target), axis=-1)
    kl = mx.mean(mx.sum(mx.exp(logp) * (logp - logq), axis=-1))
    reg = mx.mean(mx.square(out - target)) / mx.mean(mx.square(target))
    agree = mx.mean(mx.argmax(logq, axis=-1) == mx.argmax(logp, axis=-1))
    return kl + reg_weight * reg, kl, agree


class _Trainer:
    """The head, its optimizer, the cached trunk states and the step history. Every
    method runs on the engine's thread, so a checkpoint (queued behind a step still
    running when the caller is interrupted) always sees weights and history agree."""

    def __init__(self, model, vocab: np.ndarray, *, batch: int, lr: float, total_steps: int,
                 reg_weight: float, seed: int):
        self.model, self.batch, self.seed = model, batch, seed
        self.head = MTPHead.create(model, seed=seed)
        self.head.set_draft_vocab(vocab)
        self.dtype = self.head.fc.weight.dtype
        warmup = max(1, min(50, total_steps // 10))
        self.optimizer = optim.AdamW(learning_rate=optim.join_schedules(
            [optim.linear_schedule(lr / warmup, lr, warmup),
             optim.cosine_decay(lr, max(total_steps - warmup, 1), lr / 10)], [warmup]),
            weight_decay=0.01)
        self.reg_weight = reg_weight
        self.history = {"step": 0, "losses": [], "agreements": []}
        self.parts: dict[str, list] = {"hidden": [], "tokens": [], "eval_hidden": [], "eval_tokens": [],
                                       "eval_top": []}
        self._step_fn = None

    # -- the trunk pass ----------------------------------------------------------------
    def cache(self, windows: np.ndarray, held_out: bool) -> None:
        """Run the trunk over windows and keep its final hidden states (and, for held-out
        windows, its top-1 tokens over the full vocabulary, to evaluate against)."""
        tokens = mx.array(windows)
        if held_out:
            logits, hidden = trunk_forward(self.model, tokens, None)
            self.parts["eval_top"].append(mx.argmax(logits, axis=-1))
        else:
            hidden = trunk_hidden(self.model, tokens)
        prefix = "eval_" if held_out else ""
        self.parts[prefix + "hidden"].append(hidden.astype(mx.float16))
        self.parts[prefix + "tokens"].append(tokens)
        mx.eval(self.parts)

    def finish_cache(self) -> None:
        for name, parts in self.parts.items():
            setattr(self, name, mx.concatenate(parts))
        self.parts = {}
        mx.eval(self.hidden, self.eval_hidden)

    # -- optimizer steps ---------------------------------------------------------------
    def _batch(self, step: int) -> mx.array:
        """The windows of step `step`: a fixed shuffle per epoch, wrapping around so every
        batch has the same shape (one compiled step function)."""
        n = self.hidden.shape[0]
        per_epoch = math.ceil(n / self.batch)
        epoch, i = divmod(step, per_epoch)
        order = np.random.default_rng((self.seed, epoch)).permutation(n)
        return mx.array(order[(i * self.batch + np.arange(self.batch)) % n])

    def step(self) -> None:
        if self._step_fn is None:
            state = [self.head.state, self.optimizer.state]
            loss_and_grad = nn.value_and_grad(
                self.head, lambda h, t, g: _loss(self.head, h, t, g, self.reg_weight))

            def fn(hidden, tokens, target):
                (_, kl, agree), grads = loss_and_grad(hidden, tokens, target)
                self.optimizer.update(self.head, grads)
                return kl, agree

            self._step_fn = mx.compile(fn, inputs=state, outputs=state)
        idx = self._batch(self.history["step"])
        hidden, tokens = self.hidden[idx].astype(self.dtype), self.tokens[idx]
        kl, agree = self._step_fn(hidden[:, :-1], tokens[:, 1:], hidden[:, 1:])
        mx.eval(kl, agree, self.head.parameters(), self.optimizer.state)
        self.history["step"] += 1
        self.history["losses"].append(kl.item())
        self.history["agreements"].append(agree.item())

    def evaluate(self) -> tuple[float, float]:
        """(top-1 agreement with the trunk over the full vocabulary, share of the trunk's
        top-1 tokens inside the draft vocabulary) on the held-out windows."""
        hidden = self.eval_hidden.astype(self.dtype)
        out = self.head.hidden_out(hidden[:, :-1], self.eval_tokens[:, 1:])
        vocab = self.head.draft_vocab
        picked = vocab[mx.argmax(self.head.draft_logits(out), axis=-1)]
        want = self.eval_top[:, 1:]
        coverage = np.isin(np.array(want), np.array(vocab)).mean()
        return mx.mean(picked == want).item(), float(coverage)

    # -- checkpoints -------------------------------------------------------------------
    def save_state(self, path: Path, key: str) -> None:
        """Weights, optimizer state and history in one file, so a resume never mixes steps."""
        tensors = {f"head.{k}": v for k, v in tree_flatten(self.head.parameters())}
        tensors.update({f"optimizer.{k}": v for k, v in tree_flatten(self.optimizer.state)})
        meta = {"key": key, **self.history}
        tmp = _tmp(path)
        mx.save_safetensors(str(tmp), tensors, metadata={_STATE_KEY: json.dumps(meta)})
        os.replace(tmp, path)

    def load_state(self, path: Path) -> None:
        tensors, metadata = mx.load(str(path), return_metadata=True)
        self.head.load_weights([(k[5:], v) for k, v in tensors.items() if k.startswith("head.")])
        self.optimizer.state = tree_unflatten(
            [(k[10:], v) for k, v in tensors.items() if k.startswith("optimizer.")])
        self._step_fn = None  # it captured the old optimizer state
        meta = json.loads(metadata[_STATE_KEY])
        self.history = {k: meta[k] for k in self.history}

    def save_head(self, path: Path, fingerprint: str, extra: dict) -> None:
        tmp = _tmp(path)
        self.head.save(tmp, fingerprint, extra)
        os.replace(tmp, path)

    def close(self) -> None:
        """Drop the MLX arrays here, on the engine thread."""
        self.__dict__.clear()


def _tmp(path: Path) -> Path:
    # mx.save_safetensors appends ".safetensors" to any other name
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp.safetensors")


def _state_path(head_path: Path) -> Path:
    return head_path.with_name(head_path.name.removesuffix(".safetensors") + ".train.safetensors")


def _saved_key(path: Path) -> str | None:
    """The run key of the checkpoint at `path` (header only), or None."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            return json.loads(json.loads(f.read(n))["__metadata__"][_STATE_KEY])["key"]
    except (OSError, ValueError, KeyError, struct.error):
        return None


def _run_key(**parts) -> str:
    """What a checkpoint must share with this run to be continued by it."""
    h = hashlib.sha256()
    for name, value in sorted(parts.items()):
        h.update(name.encode())
        h.update(value.tobytes() if isinstance(value, np.ndarray) else repr(value).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------- driver ---

def train_mtp_head(engine, *, tokens: int = 150_000, corpus=None, out=None, epochs: int = 2,
                   steps: int | None = None, batch: int = 8, seq_len: int = 256,
                   draft_vocab: int = 8192, lr: float = 2e-3, reg_weight: float = 0.5,
                   seed: int = 0, resume: bool = True, progress: bool = True) -> TrainResult:
    """Train a draft head for `engine`'s model by self-distillation; save it to `out`.

    tokens: corpus tokens to train on (each is one head position per epoch); corpus: a
    text file or a directory of them (default: the Python standard library's sources and
    pydoc topics); out: the head file (default: next to the model, where Engine.load
    finds it); epochs, or steps (optimizer steps in all), of `batch` windows of
    `seq_len` tokens; draft_vocab: how many of the corpus's most frequent tokens the
    head may draft. With resume, a checkpoint of the same run at `out` is continued.
    The engine drafts with the new head after it is loaded again (drafter "auto" or "mtp").
    """
    if min(tokens, epochs, batch, draft_vocab) < 1 or seq_len < 4 or (steps is not None and steps < 1):
        raise InvalidRequestError("tokens, epochs, steps, batch and draft_vocab must be >= 1, seq_len >= 4")
    timings = {}
    t0 = time.perf_counter()
    out = _head_path(out, engine)
    n_train = math.ceil(tokens / (seq_len - 1))
    windows = token_windows(engine.tokenizer, corpus_pieces(corpus, seed),
                            n_train + _held_out(n_train), seq_len)
    if len(windows) < 2:
        raise InvalidRequestError(f"the corpus has fewer than {2 * seq_len} tokens")
    n_eval = _held_out(len(windows))
    train, held = windows[:-n_eval], windows[-n_eval:]
    vocab = draft_vocabulary(train, draft_vocab, engine._loaded.vocab_size)
    total = steps or epochs * math.ceil(len(train) / batch)
    key = _run_key(base=engine.fingerprint, windows=windows, vocab=vocab, batch=batch, lr=lr,
                   reg_weight=reg_weight, seed=seed, total=total)
    timings["corpus"] = time.perf_counter() - t0

    trainer = engine.call(lambda: _Trainer(engine._loaded.model, vocab, batch=batch, lr=lr,
                                           total_steps=total, reg_weight=reg_weight, seed=seed))
    try:
        timings["trunk"] = _cache_trunk(engine, trainer, train, held, progress)
        if resume:
            _resume(engine, trainer, out, key)
        extra = {"trained_by": "kernelext.mtp_train", "corpus": str(corpus or "python-stdlib"),
                 "tokens": int(train[:, 1:].size), "seq_len": seq_len, "draft_vocab_size": int(vocab.size)}
        t0 = time.perf_counter()
        done = _optimize(engine, trainer, total, out, key, extra, progress)
        timings["train"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        agreement, coverage = engine.call(trainer.evaluate)
        timings["eval"] = time.perf_counter() - t0
        history = trainer.history
        extra.update(steps=history["step"], kl=history["losses"][-1] if history["losses"] else None,
                     agreement=agreement, vocab_coverage=coverage)
        engine.call(lambda: trainer.save_head(out, engine.fingerprint, extra))
    finally:
        engine.call(trainer.close)
    positions = done * batch * (seq_len - 1)
    return TrainResult(
        path=out, steps=history["step"], losses=history["losses"], agreements=history["agreements"],
        agreement=agreement, vocab_coverage=coverage, tokens=int(train[:, 1:].size),
        tokens_per_s=positions / timings["train"] if done else 0.0, draft_vocab_size=int(vocab.size),
        timings=timings)


def _held_out(n_windows: int) -> int:
    """Windows kept out of training to evaluate on: a few suffice (the trunk computes
    full-vocabulary logits for them)."""
    return max(1, min(8, n_windows // 20))


def _head_path(out, engine) -> Path:
    path = Path(out).expanduser() if out is not None else Path(engine._loaded.path) / LOCAL_HEAD
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _cache_trunk(engine, trainer: _Trainer, train: np.ndarray, held: np.ndarray, progress: bool) -> float:
    t0 = time.perf_counter()
    per_call = max(1, TRUNK_CHUNK_TOKENS // train.shape[1])
    with tqdm(total=train.size + held.size, desc="MTP head: trunk pass", unit="tok",
              disable=not progress) as bar:
        for windows, held_out in [(train, False), (held, True)]:
            for start in range(0, len(windows), per_call):
                chunk = windows[start:start + per_call]
                engine.call(functools.partial(trainer.cache, chunk, held_out))
                bar.update(chunk.size)
    engine.call(trainer.finish_cache)
    return time.perf_counter() - t0


def _resume(engine, trainer: _Trainer, out: Path, key: str) -> None:
    """Continue from the checkpoint at `out` if it is one of this very run."""
    state = _state_path(out)
    saved = _saved_key(state)
    if saved == key:
        engine.call(lambda: trainer.load_state(state))
    elif saved is not None:
        warnings.warn(f"kernelext: {state} is a checkpoint of a different run (model, corpus or "
                      "settings); training from scratch", stacklevel=3)


def _optimize(engine, trainer: _Trainer, total: int, out: Path, key: str, extra: dict,
              progress: bool) -> int:
    """Optimizer steps up to `total`, checkpointing; returns how many ran in this call."""
    history = trainer.history  # updated on the engine thread; read here for the bar only

    def checkpoint():
        engine.call(lambda: trainer.save_state(_state_path(out), key))
        engine.call(lambda: trainer.save_head(out, engine.fingerprint, {**extra, "steps": history["step"]}))

    start, last_save = history["step"], time.monotonic()
    with tqdm(total=total, initial=start, desc="MTP head: training", unit="step",
              disable=not progress) as bar:
        try:
            while history["step"] < total:
                engine.call(trainer.step)
                recent = history["agreements"][-20:]
                bar.set_postfix(loss=f"{history['losses'][-1]:.3f}",
                                agree=f"{sum(recent) / len(recent):.0%}", refresh=False)
                bar.update()
                if time.monotonic() - last_save > CHECKPOINT_S:
                    checkpoint()
                    last_save = time.monotonic()
        except KeyboardInterrupt:
            checkpoint()
            raise
    if history["step"] > start:
        checkpoint()
    return history["step"] - start
