"""MTP draft heads: trunk hidden states, native Qwen3.5 heads, fresh heads, caches, files."""

import functools

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import qwen3_5
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

from engine.errors import ModelLoadError
from engine.spec.mtp_head import MTPHead, NoDraftHeadError, _stack_experts, trunk_forward
from tiny_models import FAMILIES, _config, tiny_model

PROMPT = [300, 12, 40, 41, 99, 43, 120, 45, 46, 100, 501, 77]  # > 8: wraps gemma's sliding window


@functools.cache
def _model(family):
    return load_model(tiny_model(family))[0]


def _tokens(n, seed=0):
    return mx.array(np.random.default_rng(seed).integers(8, 768, (1, n)))


def _head(family):
    model = _model(family)
    if family == "qwen3_5":
        return MTPHead.from_checkpoint(tiny_model(family), model)
    return MTPHead.create(model, seed=1)


# ------------------------------------------------------------ trunk_forward ---

@pytest.mark.parametrize("family", FAMILIES)
def test_trunk_forward_is_bitwise_the_model(family):
    model = _model(family)
    ref_cache, cache = make_prompt_cache(model), make_prompt_cache(model)
    for step in (mx.array([PROMPT]), mx.array([[7 + 500]]), mx.array([[64]])):  # prefill, 2 decodes
        expected = model(step, cache=ref_cache)
        logits, hidden = trunk_forward(model, step, cache)
        assert logits.shape == expected.shape and hidden.shape == (*step.shape, 64)
        assert mx.array_equal(logits, expected).item()
    # The hidden state is the final-norm output the logits are computed from.
    lm = getattr(model, "language_model", model)
    head = lm.lm_head if "lm_head" in lm else lm.model.embed_tokens.as_linear
    assert mx.array_equal(head(hidden), logits).item()


@pytest.mark.parametrize("family", FAMILIES)
def test_trunk_forward_with_batch_caches(family):
    model = _model(family)

    def batch_cache():  # two rows of different lengths, merged like ModelRunner.add_rows
        rows = []
        for prompt in (PROMPT, PROMPT[:7]):
            rows.append(make_prompt_cache(model))
            model(mx.array([prompt]), cache=rows[-1])
        return [type(layer[0]).merge(list(layer)) for layer in zip(*rows)]

    ref_cache, cache = batch_cache(), batch_cache()
    for step in ([[5], [6]], [[300], [301]]):
        expected = model(mx.array(step), cache=ref_cache)
        logits, _ = trunk_forward(model, mx.array(step), cache)
        assert mx.array_equal(logits, expected).item()


# ------------------------------------------------------ native Qwen3.5 head ---

def _raw_checkpoint(family="qwen3_5"):
    return {k: np.array(v, dtype=np.float64) for k, v in mx.load(str(tiny_model(family) / "model.safetensors")).items()}


def _reference_head(raw, hidden, next_tokens, start=0):
    """Straight numpy from the HF definitions (Qwen3-Next / Qwen3.5 MTP, as in vLLM):
    zero-centred RMSNorms (gain 1 + w), fc over [embedding, hidden], one gated full-
    attention layer (partial non-interleaved RoPE, GQA, causal), SiLU MLP, final
    norm, untied lm_head. Positions start at `start`."""
    c = _config("qwen3_5")["text_config"]
    nh, nkv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    rot, theta = int(hd * c["partial_rotary_factor"]), c["rope_parameters"]["rope_theta"]
    w = {k.removeprefix("mtp."): v for k, v in raw.items() if k.startswith("mtp.")}

    def norm(x, name):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * (1 + w[name + ".weight"])

    def linear(x, name):
        return x @ w[name + ".weight"].T

    def rope(x):  # x [L, heads, hd]; HF rotate_half on the first `rot` dims
        pos = np.arange(start, start + x.shape[0])[:, None, None]
        ang = pos * theta ** (-np.arange(0, rot, 2) / rot)
        cos, sin, half = np.cos(ang), np.sin(ang), rot // 2
        x1, x2 = x[..., :half], x[..., half:rot]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rot:]], -1)

    e = raw["model.language_model.embed_tokens.weight"][next_tokens]
    x = linear(np.concatenate([norm(e, "pre_fc_norm_embedding"), norm(hidden, "pre_fc_norm_hidden")], -1), "fc")
    L, a = x.shape[0], "layers.0.self_attn."
    y = norm(x, "layers.0.input_layernorm")
    q, gate = np.split(linear(y, a + "q_proj").reshape(L, nh, 2 * hd), 2, -1)  # per head: [query, gate]
    q = rope(norm(q, a + "q_norm"))
    k = rope(norm(linear(y, a + "k_proj").reshape(L, nkv, hd), a + "k_norm"))
    v = linear(y, a + "v_proj").reshape(L, nkv, hd)
    k, v = np.repeat(k, nh // nkv, 1), np.repeat(v, nh // nkv, 1)  # GQA: q head j uses kv head j // 2
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
    scores = np.where(np.tril(np.ones((L, L), bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    att = np.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), v).reshape(L, nh * hd)
    x = x + linear(att / (1 + np.exp(-gate.reshape(L, nh * hd))), a + "o_proj")
    y = norm(x, "layers.0.post_attention_layernorm")
    g = linear(y, "layers.0.mlp.gate_proj")
    x = x + linear(g / (1 + np.exp(-g)) * linear(y, "layers.0.mlp.up_proj"), "layers.0.mlp.down_proj")
    out = norm(x, "norm")
    return out @ raw["lm_head.weight"].T, out


def _map_norms(head, fn):
    return tree_unflatten([(k, fn(v)) for k, v in tree_flatten(head.parameters()) if "norm" in k.split(".")[-2]])


def _trunk_hidden(model, tokens):
    return trunk_forward(model, tokens, make_prompt_cache(model))[1]


def test_native_head_weights_follow_the_checkpoint_convention():
    head, raw = _head("qwen3_5"), _raw_checkpoint()
    mtp = {k.removeprefix("mtp."): v for k, v in raw.items() if k.startswith("mtp.")}
    params = dict(tree_flatten(head.parameters()))
    assert len(mtp) == 15 and set(params) == set(mtp)  # its own weights only: no embed / lm_head
    norms = {"pre_fc_norm_embedding", "pre_fc_norm_hidden", "layers.0.input_layernorm",
             "layers.0.post_attention_layernorm", "layers.0.self_attn.q_norm", "layers.0.self_attn.k_norm", "norm"}
    for name, value in mtp.items():
        expected = value + 1.0 if name.removesuffix(".weight") in norms else value  # zero-centred -> gain
        np.testing.assert_array_equal(np.array(params[name]), expected.astype(np.float32), err_msg=name)


def test_native_head_matches_hf_reference():
    model, head, raw = _model("qwen3_5"), _head("qwen3_5"), _raw_checkpoint()
    tokens = _tokens(11)
    hidden = _trunk_hidden(model, tokens)
    next_tokens = tokens[:, 1:]  # at position i: trunk h_i and the committed token i+1
    logits, out = head(hidden[:, :-1], next_tokens, head.make_cache())
    ref_logits, ref_out = _reference_head(raw, np.array(hidden[0, :-1], np.float64), np.array(next_tokens[0]))
    np.testing.assert_allclose(np.array(out[0]), ref_out, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.array(logits[0]), ref_logits, rtol=1e-4, atol=1e-3)

    # Norm weights loaded with the wrong convention (gain w instead of 1 + w) are far off.
    wrong = _head("qwen3_5")
    wrong.update(_map_norms(wrong, lambda w: w - 1.0))
    bad_logits, _ = wrong(hidden[:, :-1], next_tokens, wrong.make_cache())
    assert np.abs(np.array(bad_logits[0]) - ref_logits).max() > 1.0
    # So is the other concat order ([hidden, embedding]).
    swapped = _head("qwen3_5")
    swapped.fc.weight = mx.concatenate([head.fc.weight[:, 64:], head.fc.weight[:, :64]], axis=1)
    bad_logits, _ = swapped(hidden[:, :-1], next_tokens, swapped.make_cache())
    assert np.abs(np.array(bad_logits[0]) - ref_logits).max() > 1.0


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
def test_no_native_head(family):
    with pytest.raises(NoDraftHeadError, match=r"no MTP head.*n-gram.*train"):
        MTPHead.from_checkpoint(tiny_model(family), _model(family))


def test_norm_offset_follows_what_sanitize_did(tmp_path):
    """A checkpoint whose norms are already gains (final norm == the loaded one) gets no +1;
    a checkpoint that does not belong to the model is refused."""
    model, raw = _model("qwen3_5"), mx.load(str(tiny_model("qwen3_5") / "model.safetensors"))
    mtp = {k: v for k, v in raw.items() if k.startswith("mtp.")}
    final = model.language_model.model.norm.weight
    mx.save_safetensors(str(tmp_path / "model.safetensors"), {**mtp, "model.language_model.norm.weight": final})
    head = MTPHead.from_checkpoint(tmp_path, model)
    assert mx.array_equal(head.norm.weight, mtp["mtp.norm.weight"]).item()
    mx.save_safetensors(str(tmp_path / "model.safetensors"), {**mtp, "model.language_model.norm.weight": final + 5})
    with pytest.raises(ModelLoadError, match="final norm"):
        MTPHead.from_checkpoint(tmp_path, model)


def test_moe_mtp_layer_experts_are_stacked(tmp_path):
    """Qwen3-Next stores MTP experts one by one, Qwen3.5-MoE fused; both land in SwitchGLU."""
    text = {**_config("qwen3_5")["text_config"], "num_experts": 4, "num_experts_per_tok": 2,
            "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32}
    model = qwen3_5.Model(qwen3_5.ModelArgs.from_dict({"model_type": "qwen3_5", "text_config": text}))
    want = dict(tree_flatten(MTPHead.create(model, seed=3).parameters()))
    sw = "layers.0.mlp.switch_mlp."
    per_expert = {f"mtp.{k}": v for k, v in want.items() if ".switch_mlp." not in k}
    fused = dict(per_expert)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        for e in range(4):
            per_expert[f"mtp.layers.0.mlp.experts.{e}.{proj}.weight"] = want[f"{sw}{proj}.weight"][e]
    fused["mtp.layers.0.mlp.experts.gate_up_proj"] = mx.concatenate(
        [want[f"{sw}gate_proj.weight"], want[f"{sw}up_proj.weight"]], axis=1)
    fused["mtp.layers.0.mlp.experts.down_proj"] = want[f"{sw}down_proj.weight"]
    for layout in (per_expert, fused):
        stacked = _stack_experts({k.removeprefix("mtp."): v for k, v in layout.items()})
        assert set(stacked) == set(want)
        assert all(mx.array_equal(stacked[k], want[k]).item() for k in want)
        mx.save_safetensors(str(tmp_path / "model.safetensors"), layout)
        head = MTPHead.from_checkpoint(tmp_path, model)  # no trunk norm in the file: HF layout, +1
        assert mx.array_equal(head.layers[0].mlp.switch_mlp.up_proj.weight, want[f"{sw}up_proj.weight"]).item()
        assert mx.array_equal(head.norm.weight, want["norm.weight"] + 1).item()


# -------------------------------------------------------------------- cache ---

@pytest.mark.parametrize("family", FAMILIES)
def test_head_cache_consistency(family):
    model, head = _model(family), _head(family)
    tokens = _tokens(13, seed=2)
    hidden, nxt = _trunk_hidden(model, tokens)[:, :-1], tokens[:, 1:]
    L = nxt.shape[1]
    cache = head.make_cache()
    full_logits, full_out = head(hidden, nxt, cache)
    assert cache[0].offset == L

    steps, step_cache = [], head.make_cache()
    for i in range(L):
        steps.append(head(hidden[:, i:i + 1], nxt[:, i:i + 1], step_cache))
    scale = mx.abs(full_logits).max().item()
    assert mx.abs(mx.concatenate([s[1] for s in steps], 1) - full_out).max().item() < 1e-5
    assert mx.abs(mx.concatenate([s[0] for s in steps], 1) - full_logits).max().item() < 1e-5 * scale

    # Rejected drafts: trim the head's cache and re-feed committed trunk hiddens.
    cache[0].trim(4)
    assert cache[0].offset == L - 4
    logits, out = head(hidden[:, -4:], nxt[:, -4:], cache)
    assert mx.abs(out - full_out[:, -4:]).max().item() < 1e-5
    assert mx.abs(logits - full_logits[:, -4:]).max().item() < 1e-5 * scale

    # Depth-2 chaining writes a draft entry (head's own hidden + drafted token) at the next
    # position; after rejection, trim it and feed the committed trunk state instead.
    cache = head.make_cache()
    logits, out = head(hidden[:, :6], nxt[:, :6], cache)
    draft = mx.argmax(logits[:, -1:], axis=-1)
    head(out[:, -1:], draft, cache)  # depth 2, at position 6
    assert cache[0].offset == 7
    cache[0].trim(1)
    _, out = head(hidden[:, 6:7], nxt[:, 6:7], cache)
    assert mx.abs(out - full_out[:, 6:7]).max().item() < 1e-5


# ------------------------------------------------------- create / save / load ---

@pytest.mark.parametrize("family", FAMILIES)
def test_create_save_load(family, tmp_path):
    model = _model(family)
    head = MTPHead.create(model, seed=0)
    layer = head.layers[0]
    trunk_layer = (getattr(model, "language_model", model)).model.layers[0]
    assert type(layer) is type(trunk_layer)
    assert not getattr(layer, "is_linear", False) and not getattr(layer.self_attn, "is_sliding", False)
    own = {"fc", "pre_fc_norm_embedding", "pre_fc_norm_hidden", "layers", "norm"}  # no embed / lm_head
    assert {k.split(".")[0] for k, _ in tree_flatten(head.parameters())} == own
    assert mx.array_equal(MTPHead.create(model, seed=0).fc.weight, head.fc.weight).item()

    tokens = _tokens(9)
    logits, out = head(_trunk_hidden(model, tokens), tokens, head.make_cache())
    assert logits.shape == (1, 9, 768) and out.shape == (1, 9, 64)
    assert mx.isfinite(logits).all().item()

    path = tmp_path / "head.safetensors"
    head.save(path, "base-123", extra={"steps": 7})
    loaded = MTPHead.load(path, model, "base-123")
    mine, theirs = tree_flatten(head.parameters()), tree_flatten(loaded.parameters())
    assert [k for k, _ in mine] == [k for k, _ in theirs]
    assert all(mx.array_equal(a, b).item() and a.dtype == b.dtype for (_, a), (_, b) in zip(mine, theirs))
    assert mx.array_equal(loaded(_trunk_hidden(model, tokens), tokens)[0], logits).item()
    meta = mx.load(str(path), return_metadata=True)[1]
    assert '"steps": 7' in meta["kernelext_mtp"]

    with pytest.raises(ModelLoadError, match="base model"):
        MTPHead.load(path, model, "base-456")


def test_load_refuses_a_head_of_another_shape(tmp_path):
    path = tmp_path / "head.safetensors"
    MTPHead.create(_model("qwen3"), seed=0).save(path, "fp")
    with pytest.raises(ModelLoadError, match="qwen3"):
        MTPHead.load(path, _model("llama"), "fp")
    head = MTPHead.create(_model("llama"), seed=0)
    head.model_type = "qwen3"  # same family claim, different layer shapes
    head.save(path, "fp")
    with pytest.raises(ModelLoadError, match="do not fit"):
        MTPHead.load(path, _model("qwen3"), "fp")


def test_native_head_round_trips(tmp_path):
    model, head = _model("qwen3_5"), _head("qwen3_5")
    head.save(tmp_path / "h.safetensors", "fp")
    loaded = MTPHead.load(tmp_path / "h.safetensors", model, "fp")
    assert all(mx.array_equal(a, b).item() for (_, a), (_, b) in
               zip(tree_flatten(head.parameters()), tree_flatten(loaded.parameters())))
