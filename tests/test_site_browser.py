"""The built site in a real browser: headless Chromium over the DevTools protocol.

The site is served on 127.0.0.1 by ``http.server`` in a thread and opened in Debian's
``chromium``. On the model card the charts (SVG images) must have loaded, the tables and the
gallery cards must be there, and the console must show no errors; the other pages are opened
too (no console errors, no broken images). A PNG screenshot of the model card goes to
``$WORLDPLAY_SCREENSHOT`` (default: the test's tmp folder).

The site: ``$WORLDPLAY_SITE_DIR`` if set (``nox -s docs`` points it at the build it just made),
else a fresh build of a copy of ``docs/`` from the committed results into a tmp folder (render
step + ``sphinx-build -W --keep-going -n``).

A second site is always built here, in a tmp folder, from hostile strings (``hostile_site.py``:
the committed results with every free-text value poisoned, hostile descriptions, video fields):
it must build with ``-W -n``, its HTML must carry no markup from the data (no script with a
payload, no event-handler attribute, no ``javascript:`` link, no injected image), and in Chromium
no payload may run (``window.__pwned`` unset, no dialog) and the console must stay clean.

Without Chromium, Sphinx or websocket-client the test is skipped, unless
``WORLDPLAY_REQUIRE_BROWSER=1`` (set by ``.ci/run``), which turns a skip into a failure.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import html.parser
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUIRE = os.environ.get("WORLDPLAY_REQUIRE_BROWSER") == "1"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--no-default-browser-check", "--hide-scrollbars",
    "--remote-debugging-port=0", "--remote-allow-origins=*", "--window-size=1280,900",
]


def _unavailable(why: str):
    if REQUIRE:
        pytest.fail(f"browser test required (WORLDPLAY_REQUIRE_BROWSER=1) but {why}")
    pytest.skip(why)


def _chromium() -> str:
    for name in (os.environ.get("WORLDPLAY_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    _unavailable("no Chromium found (apt-get install chromium, or set WORLDPLAY_CHROMIUM)")


def _need_sphinx() -> None:
    try:
        import myst_parser  # noqa: F401
        import sphinx  # noqa: F401
        import sphinx_design  # noqa: F401
    except ImportError as exc:
        _unavailable(f"the docs dependencies are not installed ({exc.name}); pip install -e .[docs]")


def _build_site(tmp: Path, docs: Path | None = None, render_args: tuple[str, ...] = ()) -> Path:
    """Render + sphinx-build a copy of docs/ (the checkout stays untouched), or ``docs`` with
    the render step's ``render_args``."""
    _need_sphinx()
    if docs is None:
        docs = tmp / "docs"
        shutil.copytree(ROOT / "docs", docs, ignore=shutil.ignore_patterns("_build", "generated"))
        render_args = ("--site-config", str(docs / "site.toml"))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, "-m", "worldplay.site", "render", *render_args, "--out", str(docs / "generated")],
                   check=True, env=env, cwd=ROOT)
    html = tmp / "html"
    done = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-q", "-b", "html",
                           str(docs), str(html)], env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, f"sphinx-build failed:\n{done.stdout}\n{done.stderr}"
    return html


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    given = os.environ.get("WORLDPLAY_SITE_DIR")
    if given:
        path = Path(given)
        assert (path / "model_card.html").is_file(), f"WORLDPLAY_SITE_DIR={given} has no model_card.html"
        return path
    return _build_site(tmp_path_factory.mktemp("site"))


@contextlib.contextmanager
def _serve(folder: Path):
    handler = functools.partial(_QuietHandler, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def server(site):
    with _serve(site) as url:
        yield url


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


class Browser:
    """A minimal DevTools-protocol client: one page, console and log events collected."""

    def __init__(self, executable: str, profile: Path):
        try:
            import websocket
        except ImportError:
            _unavailable("websocket-client is not installed (pip install websocket-client)")
        self.proc = subprocess.Popen([executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited ({self.proc.returncode}): {self.proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError("chromium did not open its DevTools port within 60 s")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        for _ in range(100):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
                pages = [t for t in json.load(resp) if t.get("type") == "page"]
            if pages:
                break
            time.sleep(0.1)
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []
        for method in ("Runtime.enable", "Log.enable", "Page.enable"):
            self.call(method)

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        mine = self.next_id
        self.ws.send(json.dumps({"id": mine, "method": method, "params": params}))
        self.ws.settimeout(60)
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == mine:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self._record(msg)

    def _record(self, msg: dict) -> None:
        """Keep an event; dismiss a JavaScript dialog (alert, confirm, ...) at once, so that a
        payload that opens one is recorded instead of blocking the page."""
        self.events.append(msg)
        if msg["method"] == "Page.javascriptDialogOpening":
            self.next_id += 1
            self.ws.send(json.dumps({"id": self.next_id, "method": "Page.handleJavaScriptDialog",
                                     "params": {"accept": False}}))

    def dialogs(self) -> list[str]:
        return [e["params"].get("message", "") for e in self.events if e["method"] == "Page.javascriptDialogOpening"]

    def wait_for(self, method: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(e["method"] == method for e in self.events):
                return
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            msg = json.loads(self.ws.recv())
            if "method" in msg:
                self._record(msg)
        raise TimeoutError(f"no {method} within {timeout} s")

    def drain(self, seconds: float) -> None:
        """Collect events for a while (late console messages, failed resources)."""
        import websocket

        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.ws.settimeout(left)
            try:
                msg = json.loads(self.ws.recv())
            except websocket.WebSocketTimeoutException:
                break
            if "method" in msg:
                self._record(msg)

    def open(self, url: str) -> None:
        self.events.clear()
        self.call("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")
        self.drain(0.5)

    def evaluate(self, expression: str):
        out = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in out:
            raise RuntimeError(f"evaluate failed: {out['exceptionDetails']}")
        return out["result"].get("value")

    def console_errors(self) -> list[str]:
        errors = []
        for e in self.events:
            p = e.get("params", {})
            if e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"]))
            elif e["method"] == "Runtime.exceptionThrown":
                errors.append("exception: " + p["exceptionDetails"].get("text", "") + " "
                              + str(p["exceptionDetails"].get("exception", {}).get("description", "")))
            elif e["method"] == "Log.entryAdded" and p["entry"].get("level") == "error":
                errors.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        return errors

    def screenshot(self, path: Path, max_height: int = 16000) -> None:
        metrics = self.call("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        height = min(int(size["height"]), max_height)
        self.call("Emulation.setDeviceMetricsOverride", width=1280, height=height, deviceScaleFactor=1, mobile=False)
        self.drain(0.3)
        shot = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                         clip={"x": 0, "y": 0, "width": 1280, "height": height, "scale": 1})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        self.call("Emulation.clearDeviceMetricsOverride")

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Browser(_chromium(), tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


PAGE_FACTS = """(() => {
  const main = document.querySelector('main') || document.body;
  const svgs = [...main.querySelectorAll('img')].filter(i => i.getAttribute('src').endsWith('.svg'));
  return {
    title: document.title,
    svg: svgs.length,
    svg_broken: svgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src')),
    img_broken: [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src')),
    tables: main.querySelectorAll('table').length,
    cards: main.querySelectorAll('.wp-gallery .sd-card').length,
    not_hosted: main.querySelectorAll('.wp-gallery .wp-not-hosted').length,
    videos: [...main.querySelectorAll('.wp-gallery video')].map(v => v.getAttribute('src')),
    tiny_labels: (main.innerText.match(/tiny CPU preset — not representative/g) || []).length,
    headings: [...main.querySelectorAll('h2')].map(h => h.innerText.replace(/#$/, '').trim()),
  };
})()"""


def test_site_in_chromium(site, server, browser, tmp_path):
    """One test (so that pytest-xdist builds the site and starts Chromium once): the model card
    in detail, then every page for console errors and broken images."""
    check_model_card(server, browser, tmp_path)
    check_model_card_summary(server, browser)
    check_every_page(site, server, browser)


def check_model_card(server, browser, tmp_path):
    browser.open(f"{server}/model_card.html")
    facts = browser.evaluate(PAGE_FACTS)
    errors = browser.console_errors()
    shot = Path(os.environ.get("WORLDPLAY_SCREENSHOT") or tmp_path / "model_card.png")
    browser.screenshot(shot)
    print(f"screenshot: {shot}")
    print(json.dumps(facts, indent=1))

    assert not errors, f"console errors on the model card: {errors}"
    for section in ("What the model is", "Install", "Run", "Trajectories", "Performance", "Parity with the official code",
                    "Gallery"):
        assert any(h.startswith(section) for h in facts["headings"]), (section, facts["headings"])
    # charts: stage bars + per-chunk lines + drift + trajectory and memory map per pinned pose
    assert facts["svg"] >= 5, facts
    assert not facts["svg_broken"] and not facts["img_broken"], facts
    assert facts["tables"] >= 3, facts
    assert facts["cards"] >= 1, facts
    assert facts["cards"] == facts["not_hosted"] + len(facts["videos"]), facts
    assert all(v.startswith("https://") for v in facts["videos"]), facts
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # the per-input table (under the performance chart): one loaded thumbnail per input row
    assert browser.evaluate("Array.from(document.querySelectorAll('h3')).some(h => "
                            "h.textContent.startsWith('Per sample input'))")
    thumbs = browser.evaluate("Array.from(document.querySelectorAll('table img')).filter(i => "
                              "i.alt.endsWith('frame the model received')).map(i => [i.naturalWidth, i.width])")
    assert len(thumbs) >= 2 and all(natural > 0 and 0 < shown <= 320 for natural, shown in thumbs), thumbs


# Tables and code blocks (configs, BibTeX) wider than their box must scroll, not be clipped.
CLIPPED = """(() => {
  const out = [];
  for (const el of document.querySelectorAll('.bd-content table, .bd-content pre')) {
    const x = getComputedStyle(el).overflowX;
    if (el.scrollWidth > el.clientWidth + 1 && x !== 'auto' && x !== 'scroll') {
      out.push(el.tagName + ': ' + (el.textContent || '').trim().slice(0, 40));
    }
  }
  return out;
})()"""
ARTICLE_TEXT = "document.querySelector('.bd-article').innerText"


def check_model_card_summary(server, browser):
    """The card opens with what was measured, how fast and on which card, and what was not
    (issue 17); no template text and no placeholders."""
    browser.open(f"{server}/model_card.html")
    text = browser.evaluate(ARTICLE_TEXT)
    opening = text[: text.index("What the model is")]
    assert "frames/s" in opening and "random weights" in opening and "Not measured yet" in opening, opening
    assert "hosted" in opening, opening
    assert "This page is a template" not in text and "<this repository>" not in text
    assert "pip install -e '.[text]'" in text
    for section in ("Drift: bf16 against float32", "Parity with the official code"):
        assert "random weights" in text[text.index(section):][:600], section


def check_every_page(site, server, browser):
    pages = sorted(p.relative_to(site).as_posix() for p in site.rglob("*.html")
                   if not p.relative_to(site).as_posix().startswith(("_", "genindex", "search", "py-modindex")))
    assert "index.html" in pages and "gallery.html" in pages and any(p.startswith("generated/experiments/") for p in pages)
    problems = {}
    for page in pages:
        browser.open(f"{server}/{page}")
        facts = browser.evaluate(PAGE_FACTS)
        errors = browser.console_errors()
        clipped = browser.evaluate(CLIPPED)
        if errors or facts["img_broken"] or clipped:
            problems[page] = {"errors": errors, "broken images": facts["img_broken"], "clipped": clipped}
    assert not problems, problems


# ------------------------------------------------------------------------------------------
# the hostile site


class _MarkupScan(html.parser.HTMLParser):
    """What a page's HTML does beyond text: scripts, event handlers, links, embeds, images."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.problems: list[str] = []
        self.text: list[str] = []
        self.images: list[str] = []
        self._script = False

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            value = (value or "").strip().lower()
            if name.startswith("on"):
                self.problems.append(f"<{tag} {name}=...>")
            if name in ("href", "src", "action", "formaction", "data", "srcdoc") and value.startswith(
                    ("javascript:", "data:text/html", "vbscript:")):
                self.problems.append(f"<{tag} {name}={value[:40]}>")
        if tag in ("iframe", "object", "embed", "base", "frame"):  # (the theme has a search <form>)
            self.problems.append(f"<{tag}>")
        if tag == "img":
            self.images.append(dict(attrs).get("src") or "")
        self._script = tag == "script"

    def handle_endtag(self, tag):
        if tag == "script":
            self._script = False

    def handle_data(self, data):
        if self._script and "__pwned" in data:
            self.problems.append(f"a script with a payload: {data[:80]!r}")
        elif not self._script:
            self.text.append(data)


@pytest.fixture(scope="module")
def hostile_site(tmp_path_factory) -> Path:
    """The hostile site, rendered and built with ``sphinx-build -W --keep-going -n``."""
    from hostile_site import hostile_docs, hostile_experiments

    _need_sphinx()
    tmp = tmp_path_factory.mktemp("hostile-site")
    experiments = hostile_experiments(tmp)
    docs = hostile_docs(tmp)
    return _build_site(tmp, docs, ("--site-config", str(tmp / "site.toml"), "--experiments-dir", str(experiments)))


def test_hostile_site_shows_data_as_text_and_runs_none_of_it(hostile_site, tmp_path_factory):
    """One test (the site is built once per worker): the HTML first, then Chromium."""
    pages = sorted(p.relative_to(hostile_site).as_posix() for p in hostile_site.rglob("*.html")
                   if not p.relative_to(hostile_site).as_posix().startswith(("_", "genindex", "search")))
    assert {"card.html", "gallery.html", "generated/experiments/rollouts-samples.html"} <= set(pages)
    shown = 0
    for page in pages:
        scan = _MarkupScan()
        scan.feed((hostile_site / page).read_text(encoding="utf-8"))
        assert not scan.problems, (page, scan.problems[:10])
        assert all(src.startswith(("_images/", "../../_images/")) and src.endswith(".svg") for src in scan.images), \
            (page, scan.images)
        shown += "".join(scan.text).count("window.__pwned")
    assert shown > 100  # the payloads are on the pages, as text

    browser = Browser(_chromium(), tmp_path_factory.mktemp("chromium-hostile"))
    try:
        with _serve(hostile_site) as url:
            problems = {}
            for page in pages:
                browser.open(f"{url}/{page}")
                pwned = browser.evaluate("window.__pwned === undefined ? null : String(window.__pwned)")
                facts = browser.evaluate(PAGE_FACTS)
                if pwned or browser.dialogs() or browser.console_errors() or facts["img_broken"]:
                    problems[page] = {"pwned": pwned, "dialogs": browser.dialogs(), "errors": browser.console_errors(),
                                      "broken images": facts["img_broken"]}
            browser.open(f"{url}/gallery.html")
            videos = browser.evaluate("[...document.querySelectorAll('.wp-gallery video')].map(v => v.title)")
    finally:
        browser.close()
    assert not problems, problems
    assert videos and all("window.__pwned" in title for title in videos), videos  # the title is text too
