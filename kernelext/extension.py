"""The kernel's LLM state: settings and the engine/server lifecycle.

`Kernelext` is a traitlets Configurable registered in `shell.configurables`, so
every setting is `%config Kernelext.<name> = value` and `%config Kernelext`
lists them. There is one instance per kernel (`load`/`unload` below).

`%reload_ext kernelext` is unload + load: the old engine is closed and any
server stopped (a reload is for picking up new code, which an engine built by
the old code would not have), while `%config` settings and `--session`
conversations carry over to the new instance.
"""

from __future__ import annotations

import atexit
import dataclasses
import time

from tqdm.auto import tqdm
from traitlets import Bool, Enum, Float, Int, List, Unicode, Union, observe
from traitlets.config import Configurable

import engine
from engine import Engine, EngineConfig, ModelRegistry, SamplingParams
from engine.config import KV_DTYPES

# Traits that become EngineConfig fields (or pick the model): they apply at the next load.
_LOAD_TRAITS = ("model", "model_cache_dir", "dtype", "kv_dtype", "max_batch", "cache_dir", "block_size",
                "cache_replies", "drafter")


def _next_load(help: str) -> str:
    return help + " Applies at the next `%llm load`."


class Kernelext(Configurable):
    # -- the engine (next load) -------------------------------------------------
    model = Unicode(engine.DEFAULT_MODEL, help=_next_load(
        "Model for `%llm load` with no argument, `%%generate` and get_engine(): an alias, "
        "an mlx-lm model directory or a .gguf file.")).tag(config=True)
    model_cache_dir = Unicode(None, allow_none=True, help=_next_load(
        "Where converted models are kept (None: the engine's default, ~/.cache/kernelext/models).")).tag(config=True)
    dtype = Enum(("auto", "float32", "float16", "bfloat16", "model"), EngineConfig.dtype,
                 help=_next_load("Weight dtype; auto = float32 on CPU.")).tag(config=True)
    kv_dtype = Enum(KV_DTYPES, None, allow_none=True, help=_next_load(
        "KV cache type where quantized weights run on the CPU: auto = float16 (half the "
        "memory), float32 = the activations' (None: the engine's default).")).tag(config=True)
    max_batch = Int(EngineConfig.max_batch, help=_next_load(
        "Most requests decoded together.")).tag(config=True)
    cache_dir = Unicode(None, allow_none=True, help=_next_load(
        "Prefix-cache directory on disk (None: the engine's default).")).tag(config=True)
    hot_cache_bytes = Int(None, allow_none=True, min=0, help=(
        "Prefix-cache budget in memory (None: the engine's default). Live.")).tag(config=True)
    ssd_cache_bytes = Int(None, allow_none=True, min=0, help=(
        "Prefix-cache budget on disk (None: the engine's default). Live.")).tag(config=True)
    block_size = Int(None, allow_none=True, min=16, help=_next_load(
        "Prefix-cache block size in tokens (None: the engine's default).")).tag(config=True)
    cache_replies = Bool(None, allow_none=True, help=_next_load(
        "Also cache each reply, so a conversation that sends it back hits the cache "
        "(None: the engine's default, on).")).tag(config=True)
    drafter = Enum(("mtp", "ngram", "none"), None, allow_none=True, help=_next_load(
        "Speculative-decoding drafter (None: the engine's default). 'none' also forces "
        "plain decoding per request at once.")).tag(config=True)
    depth = Union([Int(min=0), Enum(("auto",))], default_value=None, allow_none=True, help=(
        "Speculative draft depth: an int (0 = plain decode) applies to every request at once "
        "and becomes the engine's depth at the next load; 'auto' (engine-tuned) applies at "
        "the next load; None = the engine's default.")).tag(config=True)

    # -- requests (live: the next cell uses them) ----------------------------------
    max_tokens = Int(SamplingParams.max_tokens, help="Default -n/--max-tokens.").tag(config=True)
    temperature = Float(SamplingParams.temperature,
                        help="Default -t/--temperature (0 = greedy).").tag(config=True)
    top_p = Float(SamplingParams.top_p, help="Default --top-p.").tag(config=True)
    top_k = Int(SamplingParams.top_k, help="Default --top-k (0 = off).").tag(config=True)
    seed = Int(None, allow_none=True, help="Default --seed (None = random).").tag(config=True)
    stop = List(Unicode(), help="Default --stop strings.").tag(config=True)
    system_prompt = Unicode(None, allow_none=True,
                            help="Default --system message for chat prompts.").tag(config=True)
    raw = Bool(False, help="Default --raw: send cells as raw text, no chat template.").tag(config=True)
    plain = Bool(False, help="Default --plain: print tokens instead of live Markdown.").tag(config=True)

    # -- the server (next `%llm serve`) ----------------------------------------------
    host = Unicode("127.0.0.1", help="Default `%llm serve --host`.").tag(config=True)
    port = Int(8000, help="Default `%llm serve --port`.").tag(config=True)
    api_key = Unicode(None, allow_none=True, help="Default `%llm serve --api-key`.").tag(config=True)
    serve_max_tokens = Int(None, allow_none=True, min=1, help=(
        "Default `%llm serve --default-max-tokens`: the output limit of server requests that set "
        "none (None = the server's default, 2048).")).tag(config=True)

    def __init__(self, shell=None, **kwargs):
        # Set before super().__init__, whose config loading runs the observers below.
        self.shell = shell
        self.engine: Engine | None = None
        # Every model of the kernel: the default engine above (pinned, under its model
        # name) and those loaded with `%llm load MODEL --as NAME`; the server routes to them.
        self.models = ModelRegistry()
        self.server = None
        self.sessions: dict[str, list[dict]] = {}  # --session name -> chat messages so far
        super().__init__(parent=shell, **kwargs)

    @observe(*_LOAD_TRAITS)
    def _warn_next_load(self, change) -> None:
        if self.engine is not None:
            print(f"kernelext: {change['name']} takes effect at the next `%llm load`")

    @observe("hot_cache_bytes", "ssd_cache_bytes")
    def _apply_budgets(self, change) -> None:
        set_budgets = getattr(self.engine, "set_cache_budgets", None)
        if set_budgets is not None:  # None leaves that budget as it is
            set_budgets(hot_bytes=self.hot_cache_bytes, ssd_bytes=self.ssd_cache_bytes)
        elif self.engine is not None:
            print(f"kernelext: {change['name']} takes effect at the next `%llm load`")

    # -- engine ------------------------------------------------------------------------
    def engine_config(self) -> EngineConfig:
        """EngineConfig from the traits. Settings left at None keep the engine's defaults;
        set ones this engine does not know yet (cache, speculation) are skipped with a notice."""
        wanted = dict(model_cache_dir=self.model_cache_dir, dtype=self.dtype, kv_dtype=self.kv_dtype,
                      max_batch=self.max_batch,
                      cache_dir=self.cache_dir, hot_cache_bytes=self.hot_cache_bytes,
                      ssd_cache_bytes=self.ssd_cache_bytes, block_size=self.block_size,
                      cache_replies=self.cache_replies, drafter=self.drafter, depth=self.depth)
        wanted = {k: v for k, v in wanted.items() if v is not None}
        known = {f.name for f in dataclasses.fields(EngineConfig)}
        if unknown := sorted(wanted.keys() - known):
            print(f"kernelext: this engine has no {', '.join(unknown)} setting yet; ignored")
        return EngineConfig(progress=True, **{k: v for k, v in wanted.items() if k in known})

    def load(self, model: str | None = None, hostfile: str | None = None, layout: str = "auto") -> Engine:
        """Replace the engine (closing the old one first: two models may not fit in memory).
        `hostfile`: split the model across the processes or Macs it lists, in `layout`
        (engine/distributed)."""
        model = model or self.model
        config = dataclasses.replace(self.engine_config(), hostfile=hostfile, distributed_layout=layout)
        t0 = time.perf_counter()
        # Conversion has its own bars; this one covers the silent part, loading the weights.
        with tqdm(total=2, desc=f"Loading {model}", leave=False) as bar:
            bar.set_postfix_str("resolving")
            # A bad path fails here, before the old engine is gone.
            engine.resolve_model(model, cache_dir=config.model_cache_dir, progress=config.progress)
            bar.update()
            bar.set_postfix_str("weights")
            self.unload()
            self.engine = Engine.load(model, config)  # resolves again: a cache hit now
            self.models.adopt(self.engine.model_name, self.engine, pin=True)
            bar.update()
        m = self.engine.metrics()
        ranks = f" · {m['ranks']} ranks" if m.get("ranks") else ""
        print(f"kernelext: loaded {model} · {m['backend']} ({m['blas']}) · {m['dtype']}{ranks} · "
              f"{time.perf_counter() - t0:.1f} s")
        return self.engine

    def ensure_engine(self) -> Engine:
        if self.engine is None:
            print(f"kernelext: no model loaded; loading {self.model} "
                  "(set `%config Kernelext.model = ...` to change the default)")
            self.load()
        return self.engine

    def load_as(self, model: str, name: str, *, pin: bool = False, task: str | None = None,
                hostfile: str | None = None, layout: str = "auto"):
        """Load `model` beside the others as `name` (an embedding, reranking or second
        chat model); it is evicted when memory runs short unless pinned."""
        if self.engine is not None and name == self.engine.model_name:
            raise engine.InvalidRequestError(f"{name!r} is the default model's name; pick another")
        t0 = time.perf_counter()
        config = dataclasses.replace(self.engine_config(), hostfile=hostfile, distributed_layout=layout)
        # A split model is pinned: this process cannot form a second group to reload it.
        eng = self.models.add(name, model, pin=pin or hostfile is not None, task=task, config=config)
        task = getattr(eng, "task", "generate")
        print(f"kernelext: loaded {model} as {name!r} ({task}{', pinned' if pin else ''}) · "
              f"{time.perf_counter() - t0:.1f} s")
        return eng

    def get_model(self, name: str | None = None):
        """A model by name (loading it again if it was evicted); None: the default engine."""
        if name is None or (self.engine is not None and name == self.engine.model_name):
            return self.ensure_engine()
        return self.models.get(name)

    def unload_model(self, name: str) -> None:
        if self.engine is not None and name == self.engine.model_name:
            self.unload()
        elif name in self.models:
            self.models.remove(name)
        else:
            raise engine.InvalidRequestError(f"no model named {name!r} is loaded")

    def unload(self) -> None:
        """Stop the server and close the default engine (closing flushes its cache)."""
        self.stop_server()  # it serves this engine
        if self.engine is not None:
            self.models.remove(self.engine.model_name)
            self.engine.close()
            self.engine = None

    def unload_all(self) -> None:
        self.unload()
        self.models.close()
        self.models = ModelRegistry()

    # -- requests --------------------------------------------------------------------
    def sampling_params(self, **overrides) -> SamplingParams:
        """The trait defaults, with the non-None overrides (SamplingParams field names)."""
        values = dict(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                      top_k=self.top_k, seed=self.seed, stop=list(self.stop),
                      depth=self.depth if isinstance(self.depth, int) else None)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return SamplingParams(**values)

    def chat_prompt(self, text: str, system: str | None = None,
                    session: str | None = None) -> list[dict]:
        system = system if system is not None else self.system_prompt
        head = [{"role": "system", "content": system}] if system else []
        return head + self.sessions.get(session, []) + [{"role": "user", "content": text}]

    def record_turn(self, session: str, text: str, reply: str) -> None:
        self.sessions.setdefault(session, []).extend(
            [{"role": "user", "content": text}, {"role": "assistant", "content": reply}])

    # -- server ------------------------------------------------------------------------
    def serve(self, host: str | None = None, port: int | None = None, api_key: str | None = None,
              default_max_tokens: int | None = None):
        from .server import start_server  # written separately; only needed here

        limit = default_max_tokens or self.serve_max_tokens
        self.ensure_engine()
        self.server = start_server(self.models, host=host or self.host,
                                   port=self.port if port is None else port,
                                   api_key=api_key or self.api_key,
                                   **({"default_max_tokens": limit} if limit else {}))
        return self.server

    def stop_server(self) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            server.stop()
            print(f"kernelext: stopped the server at {server.url}")

    # -- lifecycle -----------------------------------------------------------------------
    def attach(self) -> None:
        """Register with the shell: `%config` and the magics."""
        from .magics import LLMMagics

        self.shell.configurables.append(self)
        self._magics = LLMMagics(self.shell, self)
        self.shell.register_magics(self._magics)

    def detach(self) -> None:
        """Undo attach(); IPython has no unregister, so remove the entries by hand."""
        manager, magics = self.shell.magics_manager, self._magics
        for kind, table in magics.magics.items():
            for name, func in table.items():
                if manager.magics[kind].get(name) == func:
                    del manager.magics[kind][name]
        if manager.registry.get(type(magics).__name__) is magics:
            del manager.registry[type(magics).__name__]
        for obj in (self, magics):
            if obj in self.shell.configurables:
                self.shell.configurables.remove(obj)


_instance: Kernelext | None = None
_saved: dict = {}  # what outlives an unload: %config settings and conversations


def load(shell) -> Kernelext:
    global _instance
    if _instance is None:
        _instance = Kernelext(shell, config=_saved.get("config"))
        _instance.sessions = _saved.get("sessions", {})
        if shell is not None:
            _instance.attach()
        atexit.register(_instance.unload_all)  # flush the engine's cache when the kernel exits
    return _instance


def unload(shell) -> None:
    global _instance
    if _instance is None:
        return
    ext, _instance = _instance, None
    _saved.update(config=ext.config, sessions=ext.sessions)
    atexit.unregister(ext.unload_all)
    from widgets import close_dashboards

    close_dashboards()  # they watch the engine closed below
    ext.unload_all()
    if ext.shell is not None:
        ext.detach()


def current() -> Kernelext:
    """The kernel's instance; loads the extension into IPython if needed (standalone outside it)."""
    if _instance is None:
        from IPython import get_ipython

        shell = get_ipython()
        if shell is None:
            return load(None)
        shell.extension_manager.load_extension("kernelext")
    return _instance
