"""Multi-Token-Prediction (MTP) draft heads for speculative decoding.

A head predicts the token after next from the trunk's hidden state and the
token the trunk just committed. At trunk position i (hidden h_i, whose logits
gave token t_{i+1}):

    e = pre_fc_norm_embedding(embed(t_{i+1}))
    x = fc(concat[e, pre_fc_norm_hidden(h_i)])   # embedding half first
    x = decoder_layer(x)                         # causal attention over the head's own KV cache,
                                                 # rotary position i (= the trunk position)
    out = norm(x);  logits(out) -> t_{i+2}

This is vLLM's Qwen3NextMultiTokenPredictor (also used for Qwen3.5):
`torch.cat([inputs_embeds, hidden_states])`, the decoder layer, then `self.norm`
inside forward, with `compute_logits` = lm_head(out).

Which hidden states:
  * h_i is the trunk's final hidden state AFTER its final norm, the tensor the
    lm_head consumes: vLLM passes the target model's forward output (which ends
    in `self.norm`) as `target_hidden_states` for method "mtp".
  * Depth > 1 chains `out` (after the head's own final norm), with the token just
    drafted, at the next position: vLLM's Qwen3-Next MTP forward returns the
    normed state and its proposer feeds that back as the next step's hidden
    (`if self.method == "mtp": hidden_states = last_hidden_states`). So `out`
    plays exactly the role h_i plays for the trunk. (DeepSeek-V3's vLLM MTP
    instead chains the pre-norm state; Qwen's checkpoints were not trained so.)

Norms: HF Qwen3-Next/3.5 store every RMSNorm zero-centred (gain 1 + w),
mtp.* included. mlx-lm's sanitize() turns the trunk's into plain gains (+1)
but drops mtp.*, so `from_checkpoint` adds to every mtp.* norm whatever
sanitize added to the trunk's final norm in the same file (1 for HF layouts).

The head keeps its own KV cache: entry i belongs to trunk position i. After a
rejected draft, trim the head's cache back to the committed length and re-feed
the committed trunk hidden states (a head cache is a pure function of them).

Embeddings and the output projection are shared with the trunk by reference
(plain callables, not child modules): they are never copied, saved or trained.

Draft vocabulary: a trained head may be restricted to a subset of token ids
(the most frequent ones of its training corpus). It then computes logits for
those ids only, from a copy of their rows of the output projection, and puts
-inf everywhere else: drafting reads a few thousand rows instead of the whole
vocabulary, and verification stays exact (q = 0 outside the subset).
"""

from __future__ import annotations

import functools
import inspect
import json
import struct
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache

from ..cache.block_keys import file_digest
from ..cpu import quant_linear
from ..errors import ModelLoadError, NoDraftHeadError, UnsupportedModelError
from ..models.loader import output_projection

FORMAT = "kernelext-mtp-head"
FORMAT_VERSION = 2  # 2: optional `draft_vocab` tensor
_META_KEY = "kernelext_mtp"


def _text_model(model) -> nn.Module:
    """The module holding `.model` (embeddings, layers, final norm) and `.args`:
    qwen3_5 wraps its text model in `language_model`, the others are it."""
    return getattr(model, "language_model", model)


def _logits(lm, hidden: mx.array) -> mx.array:
    # The same ops, in the same order, as each family's Model.__call__, so the
    # logits are bitwise identical. Tied models have no lm_head module.
    out = lm.lm_head(hidden) if "lm_head" in lm else lm.model.embed_tokens.as_linear(hidden)
    return _softcap(lm, out)


def _softcap(lm, logits: mx.array) -> mx.array:
    cap = getattr(lm.args, "final_logit_softcapping", None)
    return mx.tanh(logits / cap) * cap if cap else logits


def _output_rows(lm, ids: mx.array) -> mx.array:
    """Rows `ids` of the output projection (lm_head or the tied embedding), dequantized."""
    proj = output_projection(lm)
    if (packed := quant_linear.quant_weight(proj)) is not None:  # kept quantized on the CPU
        return packed.rows(ids)
    if "scales" not in proj:
        return proj.weight[ids]
    biases = proj.get("biases")
    return mx.dequantize(proj.weight[ids], proj.scales[ids], None if biases is None else biases[ids],
                         proj.group_size, proj.bits, mode=proj.mode)


def trunk_hidden(model, inputs: mx.array) -> mx.array:
    """The trunk's final hidden states [B, L, D] (after the final norm), without logits."""
    return _text_model(model).model(inputs)


def trunk_forward(model, inputs: mx.array, cache) -> tuple[mx.array, mx.array]:
    """(logits [B, L, V], hidden [B, L, D]): exactly model(inputs, cache=cache), plus
    the final hidden states after the final norm (what the lm_head and MTP head read)."""
    lm = _text_model(model)
    hidden = lm.model(inputs, cache)
    return _logits(lm, hidden), hidden


def _full_attention_layer(lm) -> nn.Module:
    """A fresh decoder layer of the trunk's own class, configured like one of its
    full-attention layers (not linear attention, not sliding window)."""
    for i, layer in enumerate(lm.model.layers):
        if getattr(layer, "is_linear", False) or getattr(layer, "use_sliding", False):
            continue
        if getattr(layer.self_attn, "is_sliding", False):
            continue
        cls = type(layer)
        params = inspect.signature(cls).parameters
        kwargs = {k: v for k, v in (("layer_idx", i), ("use_sliding", False)) if k in params}
        return cls(lm.args, **kwargs)
    raise UnsupportedModelError(f"{type(lm).__module__}: no full-attention layer to build an MTP head from")


# ------------------------------------------------------------- checkpoint ---

def _checkpoint_tensors(model_dir: Path, wanted) -> dict[str, mx.array]:
    """The tensors of model_dir's safetensors whose names pass `wanted`, opening
    only the shards that hold them when there is an index."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({f for k, f in weight_map.items() if wanted(k)})
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    tensors = {}
    for f in files:
        tensors.update((k, v) for k, v in mx.load(str(model_dir / f)).items() if wanted(k))
    return tensors


def _norm_offset(lm, raw_final_norm: mx.array | None, model_dir: Path) -> float:
    """What the trunk's sanitize() added to its RMSNorm weights for this checkpoint.

    The mtp.* norms are stored like the trunk's in the same files, so they need
    the same offset: 1.0 for HF's zero-centred layout, 0.0 if already gains.
    """
    if raw_final_norm is None:
        return 1.0  # mtp.* only survive in HF layouts (mlx-lm's converter drops them)
    loaded = lm.model.norm.weight.astype(mx.float32)
    raw = raw_final_norm.astype(mx.float32)
    for offset in (1.0, 0.0):
        if mx.allclose(loaded, raw + offset, rtol=1e-2, atol=1e-2).item():
            return offset
    raise ModelLoadError(
        f"the model's final norm matches neither w nor 1 + w of the final norm in {model_dir}: "
        "pass the model loaded from this checkpoint")


def _is_norm(name: str) -> bool:
    # fc norms, input/post_attention_layernorm, q_norm / k_norm and the final norm
    return name.endswith(".weight") and "norm" in name.split(".")[-2]


def _stack_experts(w: dict[str, mx.array]) -> dict[str, mx.array]:
    """MoE MTP layers: HF stores experts one by one (Qwen3-Next) or fused
    (Qwen3.5-MoE); mlx-lm's SwitchGLU wants [experts, out, in] stacks."""
    for p in sorted({k.split(".experts.")[0] for k in w if ".experts." in k}):
        if f"{p}.experts.gate_up_proj" in w:
            gate_up = w.pop(f"{p}.experts.gate_up_proj")
            mid = gate_up.shape[-2] // 2
            w[f"{p}.switch_mlp.gate_proj.weight"] = gate_up[..., :mid, :]
            w[f"{p}.switch_mlp.up_proj.weight"] = gate_up[..., mid:, :]
            w[f"{p}.switch_mlp.down_proj.weight"] = w.pop(f"{p}.experts.down_proj")
            continue
        n = 1 + max(int(k[len(p) + 9:].split(".")[0]) for k in w if k.startswith(f"{p}.experts."))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            w[f"{p}.switch_mlp.{proj}.weight"] = mx.stack(
                [w.pop(f"{p}.experts.{e}.{proj}.weight") for e in range(n)])
    return w


# ------------------------------------------------------------------- head ---

class MTPHead(nn.Module):
    def __init__(self, model):
        """The head's skeleton for `model` (weights as constructed; use a classmethod).
        It drafts over the full vocabulary until set_draft_vocab() restricts it."""
        super().__init__()
        lm = _text_model(model)
        final_norm = lm.model.norm
        dim = lm.args.hidden_size
        self.model_type = model.model_type
        self.hidden_size = dim
        # The head's norms are the trunk's own class, so they follow the
        # trunk's convention as mlx-lm loaded it (plain gain, or gemma's 1 + w).
        norm = functools.partial(type(final_norm), dim, eps=final_norm.eps)
        self.fc = nn.Linear(2 * dim, dim, bias=False)
        self.pre_fc_norm_embedding = norm()
        self.pre_fc_norm_hidden = norm()
        self.layers = [_full_attention_layer(lm)]
        self.norm = norm()
        # Plain callables, not child modules: shared by reference, never saved or trained.
        self._embed = lm.model.embed_tokens.__call__
        self._logits = functools.partial(_logits, lm)
        self._softcap = functools.partial(_softcap, lm)
        self._output_rows = functools.partial(_output_rows, lm)
        proj = output_projection(lm)
        packed = quant_linear.quant_weight(proj)
        self.vocab_size = packed.n if packed is not None else proj.weight.shape[0]
        self._draft_vocab = self._draft_rows = None  # "_": not parameters (never trained or flattened)
        self.set_dtype(final_norm.weight.dtype)  # norms are never quantized

    def __call__(self, hidden: mx.array, next_tokens: mx.array, cache=None) -> tuple[mx.array, mx.array]:
        """hidden [B, L, D] (trunk or previous depth), next_tokens [B, L] ->
        (logits [B, L, V] for the token after next, hidden_out [B, L, D] to chain)."""
        out = self.hidden_out(hidden, next_tokens, cache)
        if self._draft_vocab is None:
            return self._logits(out), out
        sub = self.draft_logits(out)
        full = mx.full((*sub.shape[:-1], self.vocab_size), -mx.inf, sub.dtype)
        ids = mx.broadcast_to(self._draft_vocab, sub.shape)
        return mx.put_along_axis(full, ids, sub, axis=-1), out

    def hidden_out(self, hidden: mx.array, next_tokens: mx.array, cache=None) -> mx.array:
        """The head's final-norm output [B, L, D]: what its logits read and depth > 1 chains."""
        e = self.pre_fc_norm_embedding(self._embed(next_tokens))
        x = self.fc(mx.concatenate([e, self.pre_fc_norm_hidden(hidden)], axis=-1))
        if cache is None:
            cache = [None] * len(self.layers)
        mask = create_attention_mask(x, cache[0])
        for layer, c in zip(self.layers, cache):
            x = layer(x, mask, c)
        return self.norm(x)

    def draft_logits(self, hidden: mx.array) -> mx.array:
        """Logits [..., K] over the draft vocabulary for final-norm states [..., D]: the
        head's own output, or the trunk's hidden states (then they are the trunk's logits
        restricted to the draft vocabulary, which is what training distils)."""
        return self._softcap(hidden @ self._draft_rows.T)

    @property
    def draft_vocab(self) -> mx.array | None:
        """The token ids the head drafts from (None: the whole vocabulary)."""
        return self._draft_vocab

    def set_draft_vocab(self, ids) -> None:
        """Restrict drafting to token `ids` (sorted, unique), or lift the restriction (None)."""
        if ids is None:
            self._draft_vocab = self._draft_rows = None
            return
        ids = mx.array(ids, dtype=mx.int32)
        if ids.ndim != 1 or ids.size == 0 or not (
                (ids >= 0).all() and (ids < self.vocab_size).all() and (ids[1:] > ids[:-1]).all()).item():
            raise ModelLoadError(f"a draft vocabulary must be sorted unique token ids in [0, {self.vocab_size})")
        # The rows are copied once: gathering them at every call would read them twice.
        self._draft_rows = self._output_rows(ids)
        mx.eval(self._draft_rows)
        self._draft_vocab = ids

    def make_cache(self) -> list:
        return [KVCache() for _ in self.layers]

    # ----------------------------------------------------------- builders ---

    @classmethod
    def from_checkpoint(cls, model_dir, model) -> "MTPHead":
        """The native head stored as mtp.* in an HF checkpoint (Qwen3-Next / 3.5 / 3.6)."""
        model_dir = Path(model_dir)
        tensors = _checkpoint_tensors(
            model_dir, lambda k: k.startswith("mtp.") or k.endswith("model.norm.weight"))
        weights = {k.removeprefix("mtp."): v for k, v in tensors.items() if k.startswith("mtp.")}
        if not weights:
            raise NoDraftHeadError(
                f"{model_dir} has no MTP head (no mtp.* tensors), so it cannot draft for "
                "itself: use the n-gram (prompt lookup) drafter, or train a head for this "
                "model (MTPHead.create, then self-distillation).")
        lm = _text_model(model)
        final = [v for k, v in tensors.items() if not k.startswith("mtp.")]
        offset = _norm_offset(lm, final[0] if len(final) == 1 else None, model_dir)
        weights = {k: v + offset if _is_norm(k) else v for k, v in weights.items()}
        head = cls(model)
        head._set_weights(_stack_experts(weights), model_dir)
        return head

    @classmethod
    def create(cls, model, seed: int = 0) -> "MTPHead":
        """A freshly initialised head for any supported family (to be trained)."""
        head = cls(model)
        params = tree_flatten(head.parameters())
        keys = mx.random.split(mx.random.key(seed), len(params))
        new = []
        for (name, p), key in zip(params, keys):
            if p.ndim >= 2:  # matrices: unit-variance outputs for unit-variance inputs
                p = mx.random.normal(p.shape, key=key) * p.shape[-1] ** -0.5
            elif name.endswith("bias"):
                p = mx.zeros_like(p)
            new.append((name, p.astype(head.fc.weight.dtype)))
        head.update(tree_unflatten(new))
        # Norms start at unit gain; a zero-centred class (gemma's, 1 + w) needs w = 0.
        for _, m in head.named_modules():
            if m is not head and "weight" in m and m.weight.ndim == 1:
                probe = m(mx.ones((m.weight.shape[0],), m.weight.dtype))
                if mx.allclose(probe, mx.array(2.0), atol=1e-2).item():
                    m.weight = mx.zeros_like(m.weight)
        mx.eval(head.parameters())
        return head

    # --------------------------------------------------------- save / load ---

    def save(self, path, base_fingerprint: str, extra: dict | None = None) -> None:
        """One .safetensors file: the head's own weights (no embed / lm_head), its draft
        vocabulary if it has one, and JSON metadata under the `kernelext_mtp` key."""
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "model_type": self.model_type,
            "hidden_size": self.hidden_size, "num_layers": len(self.layers),
            "base_fingerprint": base_fingerprint, "extra": extra or {},
        }
        tensors = dict(tree_flatten(self.parameters()))
        if self._draft_vocab is not None:
            tensors["draft_vocab"] = self._draft_vocab
        mx.save_safetensors(str(path), tensors, metadata={_META_KEY: json.dumps(meta)})

    @classmethod
    def load(cls, path, model, base_fingerprint: str) -> "MTPHead":
        try:
            weights, metadata = mx.load(str(path), return_metadata=True)
            meta = json.loads(metadata[_META_KEY])
        except Exception as e:  # missing file, not safetensors, no / bad metadata
            raise ModelLoadError(f"{path} is not a kernelext MTP head: {type(e).__name__}: {e}") from e
        if meta.get("format") != FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
            raise ModelLoadError(f"{path}: unsupported head format {meta.get('format')!r} "
                                 f"version {meta.get('format_version')!r}")
        if meta.get("base_fingerprint") != base_fingerprint:
            raise ModelLoadError(
                f"{path} was made for base model {meta.get('base_fingerprint')!r}, not this one "
                f"({base_fingerprint!r}): a head only drafts well for the weights it was trained on")
        head = cls(model)
        if meta.get("model_type") != head.model_type or meta.get("hidden_size") != head.hidden_size:
            raise ModelLoadError(
                f"{path} is a head for a {meta.get('model_type')} model of hidden size "
                f"{meta.get('hidden_size')}, not {head.model_type} / {head.hidden_size}")
        draft_vocab = weights.pop("draft_vocab", None)
        head._set_weights(weights, path)
        if draft_vocab is not None:
            try:
                head.set_draft_vocab(draft_vocab)
            except ModelLoadError as e:
                raise ModelLoadError(f"{path}: {e}") from None
        return head

    def _set_weights(self, weights: dict[str, mx.array], source) -> None:
        dtype = self.fc.weight.dtype
        try:
            self.load_weights([(k, v.astype(dtype)) for k, v in weights.items()], strict=True)
        except ValueError as e:  # missing / unexpected keys, wrong shapes
            raise ModelLoadError(f"{source}: the MTP head's weights do not fit this model: {e}") from e
        mx.eval(self.parameters())


# --------------------------------------------------------- finding heads ---

BUNDLED_HEADS = Path(__file__).with_name("heads")  # trained heads shipped with kernelext
LOCAL_HEAD = "kernelext_mtp_head.safetensors"  # a trained head's name next to its model


def head_candidates(explicit, model_dir) -> list[Path]:
    """Where a trained head for a model may be: the configured file, next to the
    model, then the heads bundled with kernelext."""
    paths = [Path(explicit)] if explicit else []
    paths.append(Path(model_dir) / LOCAL_HEAD)
    paths += sorted(BUNDLED_HEADS.glob("*.safetensors"))
    return paths


def head_matches(path: Path, base_fingerprint: str) -> bool:
    """Whether the head file at `path` was trained for this base model (header only)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            meta = json.loads(f.read(n)).get("__metadata__", {})
        return json.loads(meta[_META_KEY]).get("base_fingerprint") == base_fingerprint
    except (OSError, ValueError, KeyError, struct.error):
        return False


def find_head(model_dir, model, fingerprint: str, name: str, *, explicit=None,
              trained: bool = True) -> tuple[MTPHead, str]:
    """The native MTP head, else (if `trained`) a trained head made for exactly this
    model. Returns the head and its identity for the prefix cache's fingerprint."""
    try:
        return MTPHead.from_checkpoint(model_dir, model), "native"
    except NoDraftHeadError as missing:
        if not trained:
            raise
        for path in head_candidates(explicit, model_dir):
            if head_matches(path, fingerprint):
                return MTPHead.load(path, model, fingerprint), file_digest(path)
        if explicit:  # asked for explicitly: say why it does not fit
            return MTPHead.load(explicit, model, fingerprint), ""
        raise NoDraftHeadError(
            f"{name} has no MTP draft head (no native mtp.* weights and no "
            "trained head for it); use drafter='ngram', or train one with "
            "engine.train_mtp_head()") from missing
