"""The tiny checkpoints load in mlx-lm, generate, and have the promised structure."""

import json
import statistics

import mlx.core as mx
import mlx_lm
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache, make_prompt_cache
from mlx_lm.sample_utils import make_sampler
from tokenizers import Tokenizer

from tiny_models import FAMILIES, tiny_model, write_tiny_model

TEXT = "Hello, world! déjà vu 🙂\n    def f(x): return x"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request):
    path = tiny_model(request.param)
    model, tokenizer = mlx_lm.load(str(path))
    return request.param, path, model, tokenizer


def _gap(logprobs: mx.array) -> float:
    top2 = mx.sort(logprobs)[-2:].tolist()
    return top2[1] - top2[0]


def test_greedy_generation_runs_to_max_tokens(loaded):
    _, _, model, tok = loaded
    prompts = [tok.apply_chat_template(CHAT, add_generation_prompt=True), tok.encode(TEXT)]
    continuations = []
    for prompt in prompts:
        responses = list(mlx_lm.stream_generate(model, tok, prompt, max_tokens=32))
        assert len(responses) == 32 and responses[-1].finish_reason == "length"
        tokens = [r.token for r in responses]
        assert not set(tokens) & set(tok.eos_token_ids)
        assert len(set(tokens)) > 5  # not stuck on one token
        # Wide top-1 margins keep greedy decoding immune to float reassociation noise.
        assert statistics.median(_gap(r.logprobs) for r in responses) > 0.5
        assert mlx_lm.generate(model, tok, prompt, max_tokens=32) == "".join(r.text for r in responses)
        continuations.append(tokens)
    assert continuations[0] != continuations[1]


def test_sampling_varies_with_seed(loaded):
    _, _, model, tok = loaded
    prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True)

    def sample(seed):
        mx.random.seed(seed)
        return mlx_lm.generate(model, tok, prompt, max_tokens=16, sampler=make_sampler(temp=1.0))

    outputs = [sample(seed) for seed in range(3)]
    assert len(set(outputs)) > 1
    assert sample(0) == outputs[0]


EXPECTED_CACHES = {
    "llama": [KVCache] * 3,
    "qwen3": [KVCache] * 3,
    "gemma3_text": [RotatingKVCache, RotatingKVCache, KVCache, RotatingKVCache],
    "qwen3_5": [ArraysCache, KVCache, ArraysCache, KVCache],
}


def test_layer_kinds(loaded):
    family, _, model, tok = loaded
    assert [type(c) for c in make_prompt_cache(model)] == EXPECTED_CACHES[family]
    if family == "gemma3_text":  # the generation prompts overflow the sliding window
        assert len(tok.apply_chat_template(CHAT, add_generation_prompt=True)) > model.args.sliding_window


def test_qwen3_5_checkpoint_is_hf_layout_with_mtp():
    path = tiny_model("qwen3_5")
    raw = mx.load(str(path / "model.safetensors"))
    h = json.loads((path / "config.json").read_text())["text_config"]["hidden_size"]
    mtp = {k for k in raw if k.startswith("mtp.")}
    attn = {f"self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")}
    mlp = {f"mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")}
    layer = attn | mlp | {"input_layernorm.weight", "post_attention_layernorm.weight"}
    assert mtp == {
        "mtp.fc.weight",
        "mtp.pre_fc_norm_embedding.weight",
        "mtp.pre_fc_norm_hidden.weight",
        "mtp.norm.weight",
        *(f"mtp.layers.0.{n}" for n in layer),
    }
    assert raw["mtp.fc.weight"].shape == (h, 2 * h)
    # The MTP layer has the trunk's full-attention layer (layer 1) shapes.
    for n in layer:
        assert raw[f"mtp.layers.0.{n}"].shape == raw[f"model.language_model.layers.1.{n}"].shape

    model, _ = mlx_lm.load(str(path))
    params = dict(tree_flatten(model.parameters()))
    assert not any("mtp." in k for k in params)  # sanitize() dropped the head
    # sanitize() turned the zero-centred norms into gains and conv1d into mlx layout.
    norm = "layers.0.input_layernorm.weight"
    assert mx.array_equal(params[f"language_model.model.{norm}"], raw[f"model.language_model.{norm}"] + 1)
    conv = "layers.0.linear_attn.conv1d.weight"
    channels, _, kernel = raw[f"model.language_model.{conv}"].shape
    assert params[f"language_model.model.{conv}"].shape == (channels, kernel, 1)


def test_tokenizer(loaded):
    family, path, _, tok = loaded
    assert tok.decode(tok.encode(TEXT, add_special_tokens=False)) == TEXT
    # The raw tokenizer.json and transformers' tokenizer agree, special tokens included.
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    chat = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    for text in (TEXT, chat):
        assert raw.encode(text).ids == tok.encode(text)
    assert (tok.encode(TEXT)[0] == tok.bos_token_id) == (family in ("llama", "gemma3_text"))


def test_chat_template(loaded):
    family, _, _, tok = loaded
    if family == "gemma3_text":
        turns = "<bos><start_of_turn>system\nBe brief.<end_of_turn>\n<start_of_turn>user\nHi!<end_of_turn>\n"
        generation_prompt = "<start_of_turn>model\n"
    else:
        turns = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        turns = ("<bos>" if family == "llama" else "") + turns
        generation_prompt = "<|im_start|>assistant\n"
    assert tok.apply_chat_template(CHAT, tokenize=False) == turns
    assert tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == turns + generation_prompt


def test_write_is_deterministic_and_seeded(tmp_path):
    files = ("model.safetensors", "tokenizer.json", "config.json")
    a, b, c = (write_tiny_model("qwen3", tmp_path / n, seed=s) for n, s in (("a", 0), ("b", 0), ("c", 1)))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints_load(tmp_path, dtype):
    model, tok = mlx_lm.load(str(write_tiny_model("qwen3_5", tmp_path, dtype=dtype)))
    assert model.language_model.lm_head.weight.dtype == getattr(mx, dtype)
    responses = list(mlx_lm.stream_generate(model, tok, TEXT, max_tokens=8))
    assert len(responses) == 8
