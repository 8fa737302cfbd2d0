"""The live dashboard (`%llm dashboard`): what the engine is doing, and knobs to change it.

The shared publisher thread reads public engine state (metrics(), the
scheduler's queues, the server's stats) and writes a widget trait only when its
value changed, one comm message per widget (hold_sync). Controls act from their
callbacks on the kernel's main thread through thread-safe engine setters, which
the engine applies between steps. The browser's messages to the kernel (a moved
slider, a click) wait while a cell runs: the kernel reads them in order.
"""

from __future__ import annotations

import html
import inspect
import os
import shutil
import sys
import threading
import time
import weakref
from collections import Counter

import ipywidgets as w

from engine import EngineError
from engine.benchmark import format_table, run_bench

from .publisher import PUBLISHER, Publisher
from .sparkline import History, bar_chart, sparkline

GiB = 2**30
DEPTHS = (0, 1, 2, 3, 4, 6, 8)  # the slider also has "auto"
DRAFTERS = ("mtp", "ngram", "none")
# Controls that need Engine.set_options(name=value); greyed out while it does not take `name`.
OPTION_CONTROLS = ("depth", "drafter", "max_batch", "temperature")

_open: weakref.WeakSet = weakref.WeakSet()


def close_dashboards() -> None:
    """Close every open dashboard (the extension's unload: they watch an engine about to close)."""
    for dashboard in list(_open):
        dashboard.close()


def _kernel_server():
    """The server `%llm serve` started, if the extension is loaded and serving."""
    ext = getattr(sys.modules.get("kernelext.extension"), "_instance", None)
    return getattr(ext, "server", None)


def _kernel_models():
    """The kernel's ModelRegistry (every model `%llm load` loaded), if the extension is loaded."""
    ext = getattr(sys.modules.get("kernelext.extension"), "_instance", None)
    return getattr(ext, "models", None)


class Dashboard(w.VBox):
    """Display `Dashboard(engine)` in a notebook; close() stops its updates."""

    bench_shape = dict(prompt_tokens=512, gen_tokens=128, batches=(1, 4, 8))  # as `%llm bench`

    def __init__(self, engine, *, publisher: Publisher | None = PUBLISHER, server=_kernel_server,
                 models=_kernel_models, clock=time.monotonic):
        """publisher: the thread that refreshes it (None: call refresh() yourself);
        server: returns the ServerHandle to show, or None; models: returns the ModelRegistry
        whose models to list, or None; clock: seconds, for the sparklines."""
        self.engine, self._publisher, self._find_server, self._clock = engine, publisher, server, clock
        self._find_models = models
        self._history = {key: History(clock()) for key in ("decode_tps", "prefill_tps")}
        self._bench_table: str | None = None  # set by the bench thread, shown by refresh()
        self.bench_thread: threading.Thread | None = None
        m = engine.metrics()
        title = _section(f"kernelext · {m['model']} · {m['backend']} · {m['dtype']}")
        panels = w.HBox([self._metrics_panel(), self._controls_panel()],
                        layout=w.Layout(flex_flow="row wrap", grid_gap="24px"))
        super().__init__(children=[title, panels])
        self.add_class("kx-dashboard")
        self.refresh()  # values from the start, not blanks until the first tick
        _open.add(self)
        if publisher is not None:
            publisher.subscribe(self.refresh)

    # -- layout ------------------------------------------------------------------------
    def _metrics_panel(self) -> w.Widget:
        self.decode, self.prefill, self.ttft = _text("kx-decode"), _text("kx-prefill"), _text("kx-ttft")
        self.decode_chart, self.prefill_chart = w.HTML(), w.HTML()
        self.occupancy, self.batch, self.sources = _bar(), _text("kx-batch"), _text("kx-sources")
        self.cache, self.evictions = _text("kx-cache"), _text("kx-evictions")
        self.hot, self.hot_usage = _bar(), _text("kx-hot")
        self.ssd, self.ssd_usage = _bar(), _text("kx-ssd")
        self.acceptance, self.speculation = w.HTML(), _text("kx-speculation")
        self.server = _text("kx-server")
        self.models = w.HTML()
        self.models.add_class("kx-models")
        return w.VBox([
            _section("Throughput"), _row("decode", self.decode, self.decode_chart),
            _row("prefill", self.prefill, self.prefill_chart), _row("TTFT", self.ttft),
            _section("Batch"), _row("occupancy", self.occupancy, self.batch), _row("sources", self.sources),
            _section("Cache"), _row("blocks", self.cache), _row("hot", self.hot, self.hot_usage),
            _row("SSD", self.ssd, self.ssd_usage), _row("evictions", self.evictions),
            _section("Speculation"), _row("acceptance", self.acceptance), _row("", self.speculation),
            _section("Server"), _row("", self.server), _section("Models"), self.models])

    def _controls_panel(self) -> w.Widget:
        eng, cfg, info = self.engine, self.engine.config, self.engine.cache_info()
        depth = getattr(cfg, "depth", None)
        style = {"description_width": "90px"}
        slider = dict(style=style, continuous_update=False)  # act once, when the slider is released
        self.depth = w.SelectionSlider(description="depth", options=_depth_options(depth),
                                       value="auto" if depth is None else depth, **slider)
        self.depth.add_class("kx-depth")  # how the browser test finds it
        # The drafter in use ("auto" already resolved to mtp or ngram by the engine).
        in_use = getattr(getattr(eng, "drafter", None), "name", None)
        self.drafter = w.Dropdown(description="drafter", options=DRAFTERS,
                                  value=in_use if in_use in DRAFTERS else "none", style=style)
        self.max_batch = w.IntSlider(description="max batch", min=1, max=max(64, cfg.max_batch),
                                     value=cfg.max_batch, **slider)
        self.temperature = w.FloatSlider(description="temperature", min=0.0, max=2.0, step=0.05,
                                         value=getattr(cfg, "temperature", 0.0), **slider)
        self.hot_budget = w.FloatSlider(
            description="hot GiB", min=0.0, step=0.125, value=cfg.hot_cache_bytes / GiB,
            max=max(_ram_bytes(), cfg.hot_cache_bytes) / GiB, disabled=not info["enabled"], **slider)
        self.ssd_budget = w.FloatSlider(
            description="SSD GiB", min=0.0, step=0.5, value=cfg.ssd_cache_bytes / GiB,
            max=max(_disk_bytes(info.get("ssd_dir")), cfg.ssd_cache_bytes) / GiB,
            disabled="ssd_dir" not in info, **slider)
        self.status = _text("kx-status")  # why a setting was refused
        self.bench_button = w.Button(description="bench", icon="tachometer",
                                     tooltip="PP/TG benchmark, as `%llm bench`")
        self.bench_result = w.HTML()
        set_options = getattr(eng, "set_options", None)
        supported = _option_names(set_options)
        for name in OPTION_CONTROLS:
            control = getattr(self, name)
            if name in supported:
                self._on_change(control, lambda value, name=name: set_options(**{name: value}))
            else:
                control.disabled, control.tooltip = True, f"needs Engine.set_options({name}=...)"
        self._on_change(self.hot_budget, lambda gib: eng.set_cache_budgets(hot_bytes=round(gib * GiB)))
        self._on_change(self.ssd_budget, lambda gib: eng.set_cache_budgets(ssd_bytes=round(gib * GiB)))
        self.bench_button.on_click(self._start_bench)
        return w.VBox([_section("Controls"), self.depth, self.drafter, self.max_batch, self.temperature,
                       self.hot_budget, self.ssd_budget, self.status, self.bench_button,
                       self.bench_result])

    def _on_change(self, control, apply) -> None:
        """Call apply(new value) on each change (from the browser: on the kernel's main thread)."""
        def changed(change):
            try:
                apply(change["new"])
                self.status.value = ""
            except EngineError as e:  # e.g. a max batch the engine's step budget cannot hold
                self.status.value = f"{control.description}: {e}"

        control.observe(changed, names="value")

    # -- bench -------------------------------------------------------------------------
    def _start_bench(self, _button) -> None:
        if self.bench_button.disabled:  # a click sent before the button greyed out
            return
        self.bench_button.disabled = True
        self.bench_result.value = "<i>benchmarking…</i>"
        # Its own thread: the run takes a while, and the publisher keeps showing it meanwhile.
        self.bench_thread = threading.Thread(target=self._run_bench, daemon=True, name="kernelext-bench")
        self.bench_thread.start()

    def _run_bench(self) -> None:
        try:
            self._bench_table = format_table(run_bench(self.engine, **self.bench_shape))
        except Exception as e:  # nobody else watches this thread: show it
            self._bench_table = f"bench failed: {e}"

    # -- updates -----------------------------------------------------------------------
    def refresh(self) -> None:
        """Show the engine's current state (the publisher's tick; tests call it directly)."""
        m = self.engine.metrics()
        self._show_throughput(m)
        self._show_batch(m)
        self._show_cache(m)
        self._show_speculation(m)
        self._show_server()
        self._show_models()
        self._show_bench()

    def _show_throughput(self, m: dict) -> None:
        now = self._clock()
        for key, label, chart in (("decode_tps", self.decode, self.decode_chart),
                                  ("prefill_tps", self.prefill, self.prefill_chart)):
            self._history[key].add(now, m[key])
            _show(label, value=f"{m[key]:.1f} tok/s")
            _show(chart, value=sparkline(self._history[key].values))
        _show(self.ttft, value=f"p50 {m['ttft_p50_s'] * 1000:.0f} ms · p99 {m['ttft_p99_s'] * 1000:.0f} ms")

    def _show_batch(self, m: dict) -> None:
        _show(self.occupancy, value=min((m["running"] + m["prefilling"]) / m["max_batch"], 1.0))
        _show(self.batch, value=f"{m['running']} running · {m['prefilling']} prefilling · "
                                f"{m['waiting']} waiting · max {m['max_batch']}")
        _show(self.sources, value=_sources(self.engine.scheduler))

    def _show_cache(self, m: dict) -> None:
        if "cache_hit_blocks" not in m:
            _show(self.cache, value="off")
            return
        _show(self.cache, value=cache_line(m))
        for tier, bar, usage in (("hot", self.hot, self.hot_usage), ("ssd", self.ssd, self.ssd_usage)):
            used, budget = m.get(f"cache_{tier}_bytes"), m.get(f"cache_{tier}_budget_bytes")
            _show(bar, value=min(used / budget, 1.0) if used and budget else 0.0)
            _show(usage, value="off" if used is None else f"{_size(used)} of {_size(budget)}")
        _show(self.evictions, value=f"hot {m.get('cache_hot_evictions', 0)} · "
                                    f"SSD {m.get('cache_ssd_evictions', 0)}")

    def _show_speculation(self, m: dict) -> None:
        # Read with defaults: engines without speculative decoding have none of these keys.
        accepted = m.get("spec_acceptance_per_position") or []
        _show(self.acceptance, value=bar_chart(accepted, [f"d{i + 1}" for i in range(len(accepted))])
              if accepted else "")
        if "spec_mean_accepted" in m:
            text = (f"{m['spec_mean_accepted']:.2f} tokens accepted per verify · "
                    f"{m.get('spec_verify_calls', 0)} verifies · depth {_depth_text(m.get('spec_depth'))}")
        else:
            text = "not in this engine"
        _show(self.speculation, value=text)

    def _show_server(self) -> None:
        server = self._find_server()
        if server is None:
            text = "not running (`%llm serve` starts it)"
        else:
            s = server.stats()
            text = (f"{server.url} · requests served {s['requests']} · "
                    f"active {s.get('active_requests', 0)} · errors {s['errors']}")
        _show(self.server, value=text)

    def _show_models(self) -> None:
        registry = self._find_models()
        rows = registry.status() if registry is not None else []
        if not rows:
            _show(self.models, value=f"{html.escape(self.engine.model_name)} only "
                                     "(`%llm load MODEL --as NAME` adds more)")
            return
        lines = []
        for m in rows:
            rate = ""
            engine = registry.resident(m["name"])
            if engine is not None:
                now = engine.metrics()
                rate = (f" · {now['texts_per_s']:.1f} texts/s" if "texts_per_s" in now
                        else f" · {now['decode_tps']:.1f} tok/s")
            lines.append(f"<b>{html.escape(m['name'])}</b> {m['task'] or '?'} · {m['state']}"
                         f"{' · pinned' if m['pinned'] else ''} · {_size(m['bytes'])}{rate}")
        budget = f"{_size(registry.used_bytes())} of {_size(registry.memory_budget)} budget"
        _show(self.models, value="<br>".join(lines + [budget]))

    def _show_bench(self) -> None:
        table, self._bench_table = self._bench_table, None
        if table is not None:
            _show(self.bench_result, value=f"<pre>{html.escape(table)}</pre>")
            _show(self.bench_button, disabled=False)

    # -- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        """Stop the updates, then close every widget of the dashboard."""
        if self._publisher is not None:
            self._publisher.unsubscribe(self.refresh)  # no refresh runs after this returns
        _open.discard(self)
        _close_all(self.children)
        super().close()


def cache_line(m: dict) -> str:
    """Blocks looked up and found, and the prompt tokens they hold: every number from the
    prefix cache's own counts, taken together when each prompt finished prefilling."""
    hit, looked = m["cache_hit_blocks"], m["cache_hit_blocks"] + m["cache_miss_blocks"]
    return (f"{hit} of {looked} prompt blocks from the cache ({hit / looked if looked else 0:.0%}) · "
            f"{m['cache_hit_tokens']} of {m['prompt_tokens']} prompt tokens")


def _show(widget: w.Widget, **traits) -> None:
    """Write the traits whose value changed, in one comm message."""
    changed = {name: value for name, value in traits.items() if getattr(widget, name) != value}
    if changed:
        with widget.hold_sync():
            for name, value in changed.items():
                setattr(widget, name, value)


def _close_all(widgets) -> None:
    for widget in widgets:
        _close_all(getattr(widget, "children", ()))
        widget.close()


def _sources(scheduler) -> str:
    """Who the requests are from, e.g. 'running 1 cell, 2 http · waiting 3 http'."""
    # Copying a list or deque is one C call, so it is atomic under the GIL even while the
    # engine thread edits them; the Sequences' `source` never changes.
    groups = {"running": [*scheduler.running, *scheduler.prefilling], "waiting": list(scheduler.waiting)}
    return " · ".join(f"{name} {_counts(seqs)}" for name, seqs in groups.items())


def _counts(seqs) -> str:
    counts = sorted(Counter(seq.source for seq in seqs).items())
    return ", ".join(f"{n} {source}" for source, n in counts) or "none"


def _option_names(set_options) -> set[str]:
    """The settings `set_options` takes (any, if it takes **options; none if there is none)."""
    if set_options is None:
        return set()
    params = inspect.signature(set_options).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return set(OPTION_CONTROLS)
    return {p.name for p in params}


def _depth_options(current) -> list:
    # A configured depth beyond the slider's range stays selectable rather than shown as another.
    ints = sorted(set(DEPTHS) | ({current} if isinstance(current, int) else set()))
    return [(str(d), d) for d in ints] + [("auto", "auto")]


def _depth_text(depth) -> str:
    if isinstance(depth, (list, tuple)):  # one depth per batch row
        return "per row " + (", ".join(map(str, depth)) or "none")
    return "?" if depth is None else str(depth)


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def _ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _disk_bytes(path: str | None) -> int:
    try:
        return shutil.disk_usage(path).total if path else 0
    except OSError:
        return 0


def _text(css_class: str) -> w.Label:
    label = w.Label()
    label.add_class(css_class)  # how the browser test finds it
    return label


def _bar() -> w.FloatProgress:
    return w.FloatProgress(min=0.0, max=1.0, layout=w.Layout(width="140px"))


def _section(title: str) -> w.HTML:
    return w.HTML(f"<b>{html.escape(title)}</b>")


def _row(name: str, *widgets: w.Widget) -> w.HBox:
    return w.HBox([w.Label(name, layout=w.Layout(width="80px")), *widgets])
