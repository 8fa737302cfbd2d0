"""The dashboard's widget values, controls and publisher thread, on a tiny-model engine.

No frontend: the widgets' comm messages are counted by replacing Widget._send.
Refreshes are called directly; engine rates decay as time passes, so tests that
compare numbers freeze one metrics() snapshot.
"""

import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import ipywidgets
import pytest

from engine import Engine, EngineConfig, InvalidRequestError, SamplingParams
from tiny_models import tiny_model
from widgets import Dashboard, close_dashboards
from widgets.dashboard import GiB, OPTION_CONTROLS, _show
from widgets.publisher import Publisher
from widgets.sparkline import History, sparkline

PROMPT = "The quick brown fox jumps over the lazy dog. " * 40  # a few 128-token cache blocks


@pytest.fixture(scope="module")
def eng(tmp_path_factory):
    e = Engine.load(tiny_model("llama"), EngineConfig(
        progress=False, max_batch=2, cache_dir=str(tmp_path_factory.mktemp("kv"))))
    yield e
    e.close()


@pytest.fixture
def dash(eng):
    d = Dashboard(eng, publisher=None, clock=lambda: 1000.0)
    yield d
    d.close()


@pytest.fixture
def frozen(eng, monkeypatch):
    """Freeze engine.metrics() at its current snapshot; the test may edit the returned dict."""
    snapshot = eng.metrics()
    monkeypatch.setattr(eng, "metrics", lambda: snapshot)
    return snapshot


@pytest.fixture
def sent(monkeypatch):
    """(widget, message) for every comm message a widget sends."""
    messages = []
    monkeypatch.setattr(ipywidgets.Widget, "_send",
                        lambda self, msg, buffers=None: messages.append((self, msg)))
    return messages


def wait_for(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@contextmanager
def paused(eng):
    """Hold the engine thread between two steps: its queues stay as they are inside."""
    held, release = threading.Event(), threading.Event()

    def hold():
        held.set()
        release.wait(60)

    thread = threading.Thread(target=eng.call, args=(hold,))
    thread.start()
    assert held.wait(60)
    try:
        yield
    finally:
        release.set()
        thread.join()


# -- what it shows ------------------------------------------------------------------------
def test_shows_the_engines_numbers_after_generations(eng, monkeypatch):
    eng.generate(PROMPT + "One.", max_tokens=24)
    eng.generate(PROMPT + "Two.", max_tokens=24)  # the shared prefix is served from the cache
    m = eng.metrics()
    monkeypatch.setattr(eng, "metrics", lambda: m)
    dash = Dashboard(eng, publisher=None, clock=lambda: 1000.0)
    assert m["decode_tps"] > 0 and m["cache_hit_blocks"] >= 3 and m["cache_hot_bytes"] > 0
    assert dash.decode.value == f"{m['decode_tps']:.1f} tok/s"
    assert dash.prefill.value == f"{m['prefill_tps']:.1f} tok/s"
    assert dash.ttft.value == f"p50 {m['ttft_p50_s'] * 1000:.0f} ms · p99 {m['ttft_p99_s'] * 1000:.0f} ms"
    assert dash.decode_chart.value.endswith(" 179.0,1.0\" fill=\"none\" stroke=\"#1f77b4\" "
                                            "stroke-width=\"1.5\"/></svg>")  # now = the peak
    assert dash.batch.value == "0 running · 0 prefilling · 0 waiting · max 2"
    looked = m["cache_hit_blocks"] + m["cache_miss_blocks"]
    assert dash.cache.value == (f"{m['cache_hit_blocks']} of {looked} prompt blocks from the cache "
                                f"({m['cache_hit_blocks'] / looked:.0%}) · "
                                f"{m['cache_hit_tokens']} of {m['prompt_tokens']} prompt tokens")
    assert m["cache_hit_tokens"] == m["cached_tokens"]  # one count, whatever shows it
    assert dash.hot.value == pytest.approx(m["cache_hot_bytes"] / m["cache_hot_budget_bytes"])
    assert dash.hot_usage.value == f"{m['cache_hot_bytes'] / 2**20:.1f} MiB of 1.00 GiB"
    assert dash.ssd_usage.value.endswith(" MiB of 8.00 GiB")
    assert dash.evictions.value == "hot 0 · SSD 0"
    dash.close()


def test_batch_shows_running_and_waiting_requests_by_source(eng, dash):
    handles = [eng.submit(PROMPT, SamplingParams(max_tokens=2000), source=source)
               for source in ("cell", "http", "http")]
    try:
        wait_for(lambda: eng.metrics()["running"] == 2)  # max_batch 2: the third waits
        with paused(eng):
            dash.refresh()
            assert dash.batch.value == "2 running · 0 prefilling · 1 waiting · max 2"
            assert dash.sources.value == "running 1 cell, 1 http · waiting 1 http"
            assert dash.occupancy.value == 1.0
    finally:
        for h in handles:
            h.cancel()


def test_speculation_bars_and_depth(dash, frozen):
    frozen.update(spec_acceptance_per_position=[0.9, 0.5, 0.25], spec_mean_accepted=1.65,
                  spec_verify_calls=12, spec_depth=[3, 2])
    dash.refresh()
    assert dash.speculation.value == "1.65 tokens accepted per verify · 12 verifies · depth per row 3, 2"
    bars = dash.acceptance.value
    assert bars.count("<rect") == 3 and "d1 90%" in bars and "d3 25%" in bars
    frozen["spec_depth"] = "auto"
    dash.refresh()
    assert dash.speculation.value.endswith("depth auto")
    for key in [k for k in frozen if k.startswith("spec_")]:
        del frozen[key]
    dash.refresh()
    assert dash.speculation.value == "not in this engine" and dash.acceptance.value == ""


def test_server_row_shows_url_requests_and_errors(eng):
    from kernelext.server import start_server

    server = start_server(eng, port=0)
    dash = Dashboard(eng, publisher=None, server=lambda: server)
    try:
        body = b'{"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}'
        for data in (body, b"{not json"):
            request = urllib.request.Request(f"{server.url}/v1/chat/completions", data=data,
                                             headers={"Content-Type": "application/json"})
            try:
                urllib.request.urlopen(request, timeout=60).read()
            except urllib.error.HTTPError as e:
                assert e.code == 400
        wait_for(lambda: server.stats()["active_requests"] == 0)  # it counts after the reply
        dash.refresh()
        assert dash.server.value == f"{server.url} · requests served 2 · active 0 · errors 1"
    finally:
        dash.close()
        server.stop()
    assert Dashboard(eng, publisher=None, server=lambda: None).server.value.startswith("not running")


def test_unchanged_values_send_nothing_and_changes_one_message_each(dash, frozen, sent):
    dash.refresh()
    sent.clear()
    dash.refresh()
    dash.refresh()
    assert sent == []
    frozen.update(decode_tps=frozen["decode_tps"] + 10, cache_hit_blocks=frozen["cache_hit_blocks"] + 1)
    dash.refresh()
    # Not the sparkline: drawn to its peak, its one point (fixed clock) is still the peak.
    assert [widget for widget, _ in sent] == [dash.decode, dash.cache]
    sent.clear()
    _show(dash.decode, value="1", tooltip="2")  # two traits, one message
    assert [msg["state"] for _, msg in sent] == [{"value": "1", "tooltip": "2"}]


# -- controls -------------------------------------------------------------------------------
def test_cache_budget_sliders_set_the_engines_budgets(eng, dash):
    before = eng.cache_info()
    try:
        dash.hot_budget.value = 0.5
        dash.ssd_budget.value = 2.0
        info = eng.cache_info()
        assert (info["hot_budget_bytes"], info["ssd_budget_bytes"]) == (GiB // 2, 2 * GiB)
        dash.refresh()
        assert dash.hot_usage.value.endswith(" of 512.0 MiB")
        assert dash.ssd_usage.value.endswith(" of 2.00 GiB")
    finally:
        eng.set_cache_budgets(hot_bytes=before["hot_budget_bytes"], ssd_bytes=before["ssd_budget_bytes"])


def test_depth_and_max_batch_controls_set_engine_options(eng, dash):
    assert dash.depth.options[-1] == ("auto", "auto") and [v for _, v in dash.depth.options[:5]] == [0, 1, 2, 3, 4]
    try:
        dash.depth.value = 2
        assert eng.config.depth == 2
        dash.depth.value = "auto"
        assert eng.config.depth == "auto"
        dash.max_batch.value = 3
        assert eng.metrics()["max_batch"] == 3
        assert dash.status.value == ""
    finally:
        eng.set_options(max_batch=2, depth="auto")


def test_a_refused_setting_is_shown(eng, monkeypatch):
    def refuse(**options):
        raise InvalidRequestError("not now")

    monkeypatch.setattr(eng, "set_options", refuse)
    dash = Dashboard(eng, publisher=None)
    dash.depth.value = 1
    assert dash.status.value == "depth: not now"
    dash.close()


def test_option_controls_follow_what_set_options_takes(eng, monkeypatch):
    def disabled():
        dash = Dashboard(eng, publisher=None)
        dash.close()
        assert not dash.hot_budget.disabled and not dash.ssd_budget.disabled  # set_cache_budgets
        return [name for name in OPTION_CONTROLS if getattr(dash, name).disabled]

    monkeypatch.setattr(eng, "set_options", lambda *, max_batch=None, depth=None: None)
    assert disabled() == ["drafter", "temperature"]
    monkeypatch.delattr(eng, "set_options")
    monkeypatch.delattr(type(eng), "set_options")
    assert disabled() == list(OPTION_CONTROLS)


def test_bench_button_runs_on_a_worker_thread_and_shows_the_table(dash):
    dash.bench_shape = dict(prompt_tokens=32, gen_tokens=8, batches=(1, 2))
    dash.bench_button.click()
    thread = dash.bench_thread
    assert dash.bench_button.disabled and "benchmarking" in dash.bench_result.value
    dash.bench_button.click()  # ignored while it runs
    assert dash.bench_thread is thread
    thread.join(300)
    dash.refresh()
    assert not dash.bench_button.disabled
    table = dash.bench_result.value
    assert "PP tok/s" in table and "TG tok/s" in table and table.count("\n") == 2


# -- the publisher thread -----------------------------------------------------------------
def test_publisher_runs_one_thread_while_anything_is_subscribed(caplog):
    publisher = Publisher(interval=0.01)
    ticks = {"a": 0, "b": 0}

    def a():
        ticks["a"] += 1

    def broken():
        raise RuntimeError("boom")

    publisher.subscribe(a)
    publisher.subscribe(broken)
    thread = publisher.thread
    wait_for(lambda: ticks["a"] >= 3)
    publisher.unsubscribe(a)
    seen = ticks["a"]
    assert publisher.thread is thread and thread.is_alive()
    publisher.unsubscribe(broken)
    assert publisher.thread is None and not thread.is_alive()
    assert ticks["a"] == seen  # nothing ran after unsubscribe() returned
    assert [r.message for r in caplog.records] == ["kernelext: a dashboard update failed"]  # once


def test_dashboard_updates_from_the_publisher_until_closed(eng):
    publisher = Publisher(interval=0.01)
    dash = Dashboard(eng, publisher=publisher)
    thread, before = publisher.thread, dash.cache.value
    eng.generate(PROMPT + "Fresh blocks.", max_tokens=4)
    wait_for(lambda: dash.cache.value != before)
    close_dashboards()
    assert publisher.thread is None and not thread.is_alive()
    assert dash.comm is None and dash.decode.comm is None


def test_extension_unload_closes_dashboards(eng):
    from kernelext import extension

    extension.load(None)
    dash = Dashboard(eng, publisher=None)
    extension.unload(None)
    assert dash.comm is None


# -- charts -----------------------------------------------------------------------------------
def test_history_keeps_one_point_per_second():
    h = History(now=100.0, seconds=5)
    h.add(100.2, 1.0)
    h.add(100.7, 2.0)  # the same second: the latest value wins
    h.add(101.1, 3.0)
    h.add(103.5, 4.0)  # second 102 had no sample: it takes the new value
    assert list(h.values) == [0.0, 2.0, 3.0, 4.0, 4.0]
    h.add(200.0, 5.0)
    assert list(h.values) == [5.0] * 5


def test_sparkline_scales_to_its_peak():
    svg = sparkline([0, 5, 10], width=102, height=12)
    assert 'points="1.0,11.0 51.0,6.0 101.0,1.0"' in svg
    assert 'points="1.0,11.0 51.0,11.0"' in sparkline([0, 0], width=52, height=12)  # all idle: flat


def test_lists_every_model_of_the_registry(eng, tmp_path):
    from engine import ModelRegistry
    from tiny_embedders import write_tiny_bert

    models = ModelRegistry(config=EngineConfig(progress=False))
    models.adopt("chat", eng)
    models.add("emb", write_tiny_bert(tmp_path / "bert"))
    models.add("later", write_tiny_bert(tmp_path / "bert2"), load=False)
    dash = Dashboard(eng, publisher=None, clock=lambda: 1000.0, models=lambda: models)
    try:
        shown = dash.models.value
        assert "<b>chat</b> generate · loaded · pinned" in shown and " tok/s" in shown
        assert "<b>emb</b> embed · loaded" in shown and " texts/s" in shown
        assert "<b>later</b> embed · unloaded" in shown and "budget" in shown
        models.get("emb").embed(["a", "b"])
        models.unload("emb")
        dash.refresh()
        assert "<b>emb</b> embed · unloaded" in dash.models.value
    finally:
        dash.close()
        models.close()
