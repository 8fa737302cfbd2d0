"""What a model directory is for, read from the files it ships with.

- An embedding model is a sentence-transformers model: modules.json lists a
  Pooling module, whose config (1_Pooling/config.json) names the pooling, and
  maybe a Normalize module. BERT-family encoders (all-MiniLM, bge, e5) and
  decoder LLMs with last-token pooling (Qwen3-Embedding) are both laid out so.
- A reranker is either a cross-encoder (architectures `*ForSequenceClassification`,
  BERT family) or a causal LM whose yes/no logits score a (query, document)
  prompt (Qwen3-Reranker: a plain `*ForCausalLM` checkpoint, so only its name or
  an explicit task says so).
- Anything else is a generation model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelLoadError, UnsupportedModelError

TASKS = ("generate", "embed", "rerank")
ENCODER_TYPES = ("bert",)  # model_type values engine/embed/bert.py implements
_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                 "pooling_mode_max_tokens": "max", "pooling_mode_lasttoken": "lasttoken"}


@dataclass
class PoolingSpec:
    task: str  # "embed" or "rerank"
    family: str  # "encoder" (engine/embed/bert.py) or "decoder" (an mlx-lm model)
    config: dict
    pooling: str = "mean"
    normalize: bool = False
    max_length: int = 512
    prompts: dict[str, str] = field(default_factory=dict)  # sentence-transformers' named prompts
    default_prompt_name: str | None = None


def _read_json(path: Path) -> dict | list | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e


def _modules(path: Path) -> list[dict]:
    modules = _read_json(path / "modules.json")
    return modules if isinstance(modules, list) else []


def detect_task(path: Path, name: str = "") -> str:
    """'embed', 'rerank' or 'generate' for the model directory `path`."""
    if any(m.get("type", "").endswith(".Pooling") for m in _modules(path)):
        return "embed"
    config = _read_json(path / "config.json") or {}
    if any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        return "rerank"
    if "reranker" in f"{name} {path.name}".lower():
        return "rerank"
    return "generate"


def pooling_spec(path: Path, task: str) -> PoolingSpec:
    """How to run the embedding or reranking model at `path`."""
    config = _read_json(path / "config.json")
    if not isinstance(config, dict) or not config.get("model_type"):
        raise ModelLoadError(f"{path} has no config.json with a model_type")
    family = "encoder" if config["model_type"] in ENCODER_TYPES else "decoder"
    spec = PoolingSpec(task=task, family=family, config=config,
                       max_length=int(config.get("max_position_embeddings") or 512))
    if family == "encoder" and task == "rerank" and not any(
            a.endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        raise UnsupportedModelError(
            f"{path}: a {config['model_type']} reranker must be a cross-encoder "
            "(architectures *ForSequenceClassification)")
    st = _read_json(path / "sentence_bert_config.json") or {}
    if st.get("max_seq_length"):
        spec.max_length = min(spec.max_length, int(st["max_seq_length"]))
    if task == "embed":
        modules = _modules(path)
        pooling_dir = next((m.get("path", "") for m in modules if m.get("type", "").endswith(".Pooling")), None)
        pooling = _read_json(path / pooling_dir / "config.json") if pooling_dir else None
        if pooling:
            modes = [mode for key, mode in _POOLING_KEYS.items() if pooling.get(key)]
            if len(modes) != 1:
                raise UnsupportedModelError(
                    f"{path}: pooling {modes or 'none'} is not supported (one of {list(_POOLING_KEYS.values())})")
            spec.pooling = modes[0]
        else:  # no sentence-transformers config: the usual choice per family
            spec.pooling = "mean" if family == "encoder" else "lasttoken"
        spec.normalize = any(m.get("type", "").endswith(".Normalize") for m in modules) or not modules
        st_config = _read_json(path / "config_sentence_transformers.json") or {}
        spec.prompts = {k: v for k, v in (st_config.get("prompts") or {}).items() if isinstance(v, str)}
        spec.default_prompt_name = st_config.get("default_prompt_name")
    return spec
