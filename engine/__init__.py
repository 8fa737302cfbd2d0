"""kernelext's inference engine (no Jupyter imports).

`backend.configure()` must run before anything imports mlx.core: on Linux it
loads an optimized BLAS that MLX then binds to (see backend.py).
"""

from . import backend as _backend

_backend.configure()

from .config import EngineConfig  # noqa: E402
from .errors import (  # noqa: E402
    EngineClosedError,
    EngineError,
    InvalidRequestError,
    ModelLoadError,
    NoDraftHeadError,
    QueueFullError,
    UnsupportedModelError,
)
from .handle import RequestHandle  # noqa: E402
from .llm_engine import Engine  # noqa: E402
from .model_store import DEFAULT_MODEL, resolve_model  # noqa: E402
from .outputs import Completion, Delta, TokenLogprob, Usage  # noqa: E402
from .sampling_params import SamplingParams  # noqa: E402

__all__ = [
    "DEFAULT_MODEL", "Completion", "Delta", "Engine", "EngineClosedError", "EngineConfig",
    "EngineError", "InvalidRequestError", "ModelLoadError", "NoDraftHeadError", "QueueFullError", "RequestHandle",
    "SamplingParams", "TokenLogprob", "UnsupportedModelError", "Usage", "resolve_model",
]
