"""`worldplay serve` in a real browser: headless Chromium (the DevTools client of
tests/test_site_browser.py) loads the page, starts a world, holds keys, receives frames; the server
must have generated the chunks with exactly those actions, and the page must show frames, the
map and the latency with no console errors. A PNG screenshot goes to
``$WORLDPLAY_SERVE_SCREENSHOT`` (default: the test's tmp folder).

Skipped without Chromium, websocket-client or aiohttp, unless ``WORLDPLAY_REQUIRE_BROWSER=1``
(set by ``.ci/run``), which turns the skip into a failure.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from test_site_browser import Browser, _chromium, _unavailable

from worldplay.actions import Motion

try:
    import aiohttp  # noqa: F401
except ImportError:
    aiohttp = None

KEY_CODES = {"w": ("KeyW", 87), "a": ("KeyA", 65), "ArrowLeft": ("ArrowLeft", 37), "ArrowUp": ("ArrowUp", 38)}


@pytest.fixture(scope="module")
def live():
    if aiohttp is None:
        _unavailable("aiohttp is not installed (pip install 'worldplay[serve]')")
    from worldplay.models import random_models, random_text_states
    from worldplay.rollout import RolloutSettings, WorldPlayPipeline
    from worldplay.serve.engine import Engine
    from worldplay.serve.server import RunningServer, Server

    models = random_models("tiny", 0, device="cpu", dtype=torch.bfloat16)
    pipe = WorldPlayPipeline(models.dit, models.vae, device="cpu", dtype=torch.bfloat16)
    engine = Engine(pipe, RolloutSettings(num_chunk=60), (64, 96), lambda prompt: random_text_states("tiny", 0),
                    random_weights=True)
    server = RunningServer(Server(engine))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    b = Browser(_chromium(), tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


def _key(browser: Browser, kind: str, key: str) -> None:
    code, vk = KEY_CODES[key]
    browser.call("Input.dispatchKeyEvent", type=kind, key=key, code=code, windowsVirtualKeyCode=vk)


def _wait(what: str, check, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _chunk_with(live, keys: list[str], after: int = -1) -> dict | None:
    return next((r for r in list(live.server.records) if r["keys"] == keys and r["chunk"] > after), None)


def test_the_page_plays_with_keys_in_chromium(live, page, tmp_path):
    page.open(live.url + "/")
    _wait("the hello message", lambda: page.evaluate(
        "window.worldplay.connected && !document.getElementById('start').disabled"))
    assert page.evaluate("[...document.querySelectorAll('#sample option')].map(o => o.value)")[0] == "synthetic"
    page.evaluate("document.getElementById('start').click()")
    _wait("the first frames", lambda: page.evaluate("window.worldplay.framesShown > 0"))

    _key(page, "keyDown", "w")
    forward = _wait("a chunk made with w held", lambda: _chunk_with(live, ["w"]))
    _key(page, "keyDown", "ArrowLeft")
    turning = _wait("a chunk made with w and left held", lambda: _chunk_with(live, ["left", "w"], forward["chunk"]))
    _key(page, "keyUp", "ArrowLeft")
    _key(page, "keyUp", "w")
    still = _wait("a chunk made with nothing held", lambda: _chunk_with(live, [], turning["chunk"]))
    assert forward["label"] == Motion("w").label
    assert turning["label"] == Motion("w", "left").label
    assert still["label"] == Motion().label
    # The page has shown those chunks (frames, the latency of each key change, the map).
    _wait("the page to show the still chunk",
          lambda: page.evaluate(f"window.worldplay.lastChunk >= {still['chunk']}"), timeout=30)

    state = page.evaluate("window.worldplay")
    minimap_ink = page.evaluate("""(() => {
      const c = document.getElementById('minimap'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n; })()""")
    shot = Path(os.environ.get("WORLDPLAY_SERVE_SCREENSHOT") or tmp_path / "serve.png")
    page.screenshot(shot)
    print(f"screenshot: {shot}")
    errors = page.console_errors()

    assert not errors and not state["errors"], (errors, state["errors"])
    assert state["world"] == forward["world"] == still["world"]
    assert state["framesShown"] >= 13 + 16 * 2
    assert len(state["latenciesMs"]) >= 3 and all(0 < ms < 60_000 for ms in state["latenciesMs"])
    assert minimap_ink > 100  # the trajectory and the camera marker are drawn
    assert page.evaluate("document.getElementById('action').textContent").startswith("0 (none / none)")
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
