"""kernelext's inference engine (no Jupyter imports).

The data path, in the order a request flows:

    llm_engine.Engine        front, any thread, no MLX: encode the prompt, admit it
        |                    (core/admission), post it to the MLX thread's queue
    core/worker              the one MLX thread: drains commands, steps every core
    core/engine_core         one step: cancel -> schedule -> prefill -> decode/verify -> emit
      core/scheduler         decides: which prompt chunks this step, who joins the batch
      cache/prefix_cache     restores cached blocks (hot_tier in RAM, ssd_tier on disk,
                             block_keys, handlers per cache kind) and publishes new ones
      spec/drafters          proposes draft tokens (n-gram, MTP head); spec/controller
                             picks each row's depth from acceptance and step cost
      core/model_runner      executes: batched prefill, decode and verify forwards
                             (models/loader's weights, cpu/ kernels on the CPU)
      structured/            grammar constraints: each row's matcher, its next-token
                             masks computed beside the forward (llguidance)
      sampling/sampler       keyed host sampling (after the mask); spec/verify checks
                             drafts exactly
      core/output_processor  text deltas, stops, usage -> the caller's RequestHandle
      distributed/           with a hostfile: the runner's and the prefix cache's calls
                             are also sent to the other ranks, which replay them on
                             their part of the model (mx.distributed ring)

`backend.configure()` must run before anything imports mlx.core: on Linux it
loads an optimized BLAS that MLX then binds to (cpu/backend.py). Importing this
package does not import MLX: the core is imported on the MLX thread.
"""

import importlib
import importlib.abc
import importlib.util
import sys

from .cpu import backend as _backend

_backend.configure()

from .config import EngineConfig  # noqa: E402
from .errors import (  # noqa: E402
    DistributedGroupError,
    EngineClosedError,
    EngineError,
    InvalidRequestError,
    ModelLoadError,
    NoDraftHeadError,
    QueueFullError,
    UnsupportedModelError,
)
from .embed.pooling_engine import PoolingEngine, RerankResult  # noqa: E402
from .handle import RequestHandle  # noqa: E402
from .llm_engine import Engine  # noqa: E402
from .models.store import DEFAULT_EMBEDDING_MODEL, DEFAULT_MODEL, resolve_model  # noqa: E402
from .outputs import Completion, Delta, TokenLogprob, Usage  # noqa: E402
from .registry import ModelRegistry, open_model  # noqa: E402
from .sampling.params import SamplingParams  # noqa: E402

__all__ = [
    "DEFAULT_EMBEDDING_MODEL", "DEFAULT_MODEL", "Completion", "Delta", "DistributedGroupError", "Engine", "EngineClosedError", "EngineConfig",
    "EngineError", "InvalidRequestError", "ModelLoadError", "ModelRegistry", "NoDraftHeadError", "PoolingEngine", "QueueFullError", "RequestHandle", "RerankResult",
    "SamplingParams", "TokenLogprob", "UnsupportedModelError", "Usage", "open_model", "resolve_model",
]

# Module paths from before the engine was grouped into folders, kept so that user
# code and notebooks that import them (`from engine.tuning import CODE`) keep working.
# Resolved lazily, on first import, so `import engine` stays free of MLX.
_MOVED = {
    "backend": "cpu.backend", "row_kernels": "cpu.row_kernels", "packed_gemm": "cpu.packed_gemm",
    "worker": "core.worker", "scheduler": "core.scheduler", "sequence": "core.sequence",
    "model_runner": "core.model_runner",
    "sampling_params": "sampling.params", "sampler": "sampling.sampler",
    "text_stream": "sampling.text_stream",
    "prefix_cache": "cache.prefix_cache", "hot_cache": "cache.hot_tier",
    "ssd_cache": "cache.ssd_tier", "kv_blocks": "cache.block_keys",
    "cache_handlers": "cache.handlers", "recurrent_capture": "cache.recurrent_capture",
    "drafters": "spec.drafters", "speculative": "spec.verify", "speculation": "spec.controller",
    "mtp_head": "spec.mtp_head", "mtp_train": "spec.mtp_train", "tuning": "spec.tuning",
    "model_store": "models.store", "gguf_convert": "models.gguf_convert", "loader": "models.loader",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package == __name__ and name in _MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        module = importlib.import_module(f"{__name__}.{_MOVED[spec.name.rpartition('.')[2]]}")
        spec.loader_state = module.__spec__  # the import system stamps the old name's spec on it
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state  # already executed under its new name


sys.meta_path.insert(0, _MovedModules())
