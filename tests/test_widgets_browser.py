"""The dashboard in a real frontend: JupyterLab in headless Chromium, driven by Playwright.

What only a browser shows: the publisher thread's updates reach the page while the
kernel's main thread runs a long generation cell and while an HTTP client generates,
and a slider dragged in the page changes the running engine. Screenshots go to
artifacts/ (git-ignored).

Needs Debian's chromium and the `playwright` and `jupyterlab` packages (the browser
itself never comes from Playwright: `playwright install` downloads are blocked).
"""

import importlib.util
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tiny_models import tiny_model

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
LONG = "The quick brown fox jumps over the lazy dog. " * 40  # a few 128-token cache blocks


def _missing() -> str | None:
    if not os.path.exists(CHROMIUM):
        return f"no {CHROMIUM} (apt-get install -y chromium)"
    for module in ("playwright", "jupyterlab"):
        if importlib.util.find_spec(module) is None:
            return f"the {module} package is not installed (pip install {module})"
    return None


pytestmark = [pytest.mark.skipif(_missing() is not None, reason=f"browser test: {_missing()}"),
              pytest.mark.timeout(300)]


def _notebook(model: Path) -> dict:
    cells = [
        f"%load_ext kernelext\n%config Kernelext.model = {str(model)!r}\n%llm load\n"
        "%llm serve --port 0\nfrom kernelext import get_engine",
        "%llm dashboard",
        # %%generate, several times: each prompt shares a cached prefix, so the cache moves too.
        f"long = {LONG!r}\nfor i in range(16):\n"
        "    get_ipython().run_cell_magic('generate', '-n 300', long + f'Story {i}:')",
        "print(get_engine().config.depth)",
    ]
    return {"nbformat": 4, "nbformat_minor": 5, "metadata": {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "cells": [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "source": src,
                   "outputs": [], "execution_count": None} for i, src in enumerate(cells)]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a temp root holding the notebook; yields its notebook URL."""
    tmp = tmp_path_factory.mktemp("lab")
    root, home = tmp / "root", tmp / "home"
    root.mkdir()
    (root / "dash.ipynb").write_text(json.dumps(_notebook(tiny_model("llama"))))
    settings = home / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)  # no "fetch news?" toast over the screenshot
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               KERNELEXT_MODEL_CACHE=str(tmp / "models"), KERNELEXT_KV_CACHE=str(tmp / "kv"),
               JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_DATA_DIR=str(home / "data"),
               JUPYTER_RUNTIME_DIR=str(home / "runtime"), JUPYTERLAB_SETTINGS_DIR=str(home / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"))
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
        # Nothing that would reach the network.
        "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly"]
    with open(tmp / "server.log", "wb") as log:  # the child keeps its own copy of the file
        server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for_server(server, f"{base}/api/status?token={token}", tmp / "server.log")
        yield f"{base}/lab/tree/dash.ipynb?token={token}"
    finally:
        try:  # shuts the kernel down too
            urllib.request.urlopen(urllib.request.Request(
                f"{base}/api/shutdown?token={token}", method="POST"), timeout=10)
            server.wait(30)
        except Exception:
            server.kill()
            server.wait()


def _wait_for_server(server, status_url: str, log: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert server.poll() is None, f"jupyter lab exited:\n{log.read_text()}"
        try:
            urllib.request.urlopen(status_url, timeout=2)
            return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"jupyter lab did not start:\n{log.read_text()}")


@pytest.fixture(scope="module")
def page(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(90_000)
        page.goto(lab)
        page.wait_for_function("window.jupyterapp?.shell.currentWidget?.sessionContext?.session?.kernel")
        yield page
        browser.close()


# The notebook panel, its cells, and the dashboard's labels, as seen by the page.
_RUN = """async ([index, wait]) => {
    const app = window.jupyterapp, panel = app.shell.currentWidget;
    await panel.sessionContext.ready;
    panel.content.activeCellIndex = index;
    const done = app.commands.execute('notebook:run-cell');
    if (wait) await done;
}"""
_SAMPLE = """(index) => {
    const text = (cls) => document.querySelector('.kx-dashboard .' + cls)?.textContent ?? null;
    const prompt = document.querySelectorAll('.jp-Notebook .jp-Cell')[index]
        ?.querySelector('.jp-InputPrompt')?.textContent ?? '';
    return {running: prompt.includes('*'), decode: text('kx-decode'), cache: text('kx-cache'),
            sources: text('kx-sources'), server: text('kx-server')};
}"""


def run_cell(page, index: int, wait: bool = True) -> None:
    page.evaluate(_RUN, [index, wait])


def output_of(page, index: int) -> str:
    return page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".jp-OutputArea-output").inner_text()


def sample_while(page, cell: int, seconds_max: float, stop=lambda s: False) -> list[dict]:
    """Dashboard samples, four a second, until `stop(sample)` or the time is up."""
    samples, deadline = [], time.monotonic() + seconds_max
    while time.monotonic() < deadline:
        samples.append(page.evaluate(_SAMPLE, cell))
        if stop(samples[-1]):
            break
        time.sleep(0.25)
    return samples


def test_dashboard_updates_live_and_its_depth_slider_changes_the_engine(page):
    ARTIFACTS.mkdir(exist_ok=True)
    run_cell(page, 0)
    run_cell(page, 1)
    page.wait_for_selector(".kx-dashboard .kx-decode")

    # 1. While the generation cell keeps the kernel's main thread busy.
    run_cell(page, 2, wait=False)
    page.wait_for_function(f"({_SAMPLE})(2).running")
    # The screenshot once a later prompt decodes and the cache has hits: every panel has numbers.
    samples = sample_while(page, 2, 60, stop=lambda s: "running 1 cell" in s["sources"]
                           and not s["cache"].startswith("0 hit") and s["decode"] != "0.0 tok/s")
    page.locator(".kx-dashboard").screenshot(path=ARTIFACTS / "dashboard.png")
    samples += sample_while(page, 2, 90, stop=lambda s: not s["running"])
    busy = [s for s in samples if s["running"]]
    decode = {s["decode"] for s in busy}
    cache = {s["cache"] for s in busy}
    assert len(decode - {"0.0 tok/s"}) >= 3, decode
    assert len(cache) >= 3, cache
    assert not samples[-1]["running"], "the generation cell did not finish in time"

    # 2. While an HTTP client generates (the kernel is idle; the request counts show too).
    url = re.search(r"http://[\d.]+:\d+", samples[-1]["server"]).group()
    body = json.dumps({"model": "default", "max_tokens": 400,
                       "messages": [{"role": "user", "content": LONG}]}).encode()
    client = threading.Thread(target=lambda: urllib.request.urlopen(urllib.request.Request(
        f"{url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}),
        timeout=120).read())
    client.start()
    seen = sample_while(page, 2, 60, stop=lambda s: "running 1 http" in s["sources"])
    client.join()
    assert "running 1 http" in seen[-1]["sources"], seen[-1]
    page.wait_for_function(f"({_SAMPLE})(2).server.includes('requests served 1 ·')")

    # 3. Drag the depth slider (0 1 2 3 4 6 8 auto, now at auto) to 2; the engine reads it back.
    track = page.locator(".kx-depth .noUi-target").bounding_box()
    page.locator(".kx-depth .noUi-handle").hover()
    page.mouse.down()
    page.mouse.move(track["x"] + track["width"] * 2 / 7, track["y"] + track["height"] / 2, steps=8)
    page.mouse.up()
    page.wait_for_function("document.querySelector('.kx-depth .widget-readout').textContent === '2'")
    run_cell(page, 3)
    assert output_of(page, 3).strip() == "2"
