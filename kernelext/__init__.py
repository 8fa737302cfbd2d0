"""kernelext: an MLX LLM engine inside the Jupyter kernel.

    %load_ext kernelext
    %llm load                 # the default model, or %llm load PATH
    %%generate -n 64
    Write a haiku about {topic}.

    %llm load all-minilm-l6-v2 --as embed     # more models beside it, by name

From Python cells: `from kernelext import get_engine; get_engine().generate(...)`,
`get_model("embed").embed(texts)`.
IPython parts are imported lazily, so `python -m kernelext.demo` needs no IPython.
"""

import engine as _engine  # noqa: F401  (first: loads the fast BLAS before anything imports mlx.core)


def load_ipython_extension(ipython) -> None:
    from . import extension

    extension.load(ipython)


def unload_ipython_extension(ipython) -> None:
    """Stop the server, close the engine and remove the magics and the `%config` entry."""
    from . import extension

    extension.unload(ipython)


def get_engine():
    """The kernel's Engine, loading `Kernelext.model` (with a notice) if none is loaded."""
    from . import extension

    return extension.current().ensure_engine()


def get_model(name: str | None = None):
    """A model of the kernel by its `%llm load ... --as NAME` name (an Engine, or a
    PoolingEngine for embedding and reranking models); None: the default engine."""
    from . import extension

    return extension.current().get_model(name)
