"""The web app: a static page, one WebSocket per player, uploads over HTTP (aiohttp).

Threads: the event loop only parses messages, samples keys and moves bytes. Model work (image
preparation for a world, prompt embeddings, every chunk) runs in one model thread, so exactly
one generation is in flight; JPEG encoding runs in another, so the next chunk's DiT overlaps
the encoding, sending and playback of the current one. Flow control: the server generates
chunk k once the page has started showing chunk k - ``lead`` (default 1: one chunk is computed
while the previous one plays), so latency does not pile up when the GPU is faster than playback.
Within that, a chunk starts just in time: when the chunks ahead of it will have played out
in its expected generation time plus a margin (:data:`JIT_MARGIN_S`), so its keys are read as
late as possible (lower latency) on a fast GPU; on a slow one it starts at once.

What running ahead costs in latency (generation time ``g``, margin ``m``, a chunk plays for 1 s):
a chunk's keys are sampled when its generation starts, ``g + m`` before the chunk ahead of it
runs out, and the chunk is shown when that one has played out. A key change made just before a
sampling is shown ``g + m`` later; one made just after waits for the next sampling, 1 s later:
between ``g + m`` and ``1 s + g + m``, ``0.5 s + g + m`` on average. Sampling when chunk k starts
playing (no just-in-time start) would cost a full second more at worst: from 1 s to 2 s. When
``g`` exceeds a chunk's playback the GPU is slower than real time, the next chunk starts at once,
playback stalls for ``g - 1 s`` each chunk, and a change waits up to about ``2 g``. The VAE decode
runs in the same model thread, on the same GPU, after the DiT (the two-GPU pipeline of
:mod:`worldplay.pipelined`, decode on a second GPU, runs in the bench only, not in the server).
The ``interactive`` experiment measures all of this.

Safety:

* binds to 127.0.0.1 unless told otherwise; any other host needs a token (``--token``), which
  ``/ws`` and ``/api/*`` then require (``?token=`` or ``Authorization: Bearer``);
* without a token, requests must name a loopback host (a DNS-rebinding page cannot reach the
  server under its own name); a browser's cross-origin WebSocket or upload is refused;
* one player per server (per GPU): others get a ``busy`` message and are closed;
* malformed, oversized or unexpected messages end the connection with a one-line reason
  (:mod:`worldplay.serve.protocol`); a silent client is closed after ``idle_timeout_s``;
* a player who leaves mid-chunk frees the GPU when that chunk ends: no further chunk starts,
  and the next player is admitted once the model thread is idle;
* uploads are capped (:data:`~worldplay.serve.protocol.MAX_UPLOAD_BYTES`) and decoded by
  :func:`worldplay.media.load_image`, with the CLI's checks and limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import ipaddress
import logging
import math
import secrets
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources

import numpy as np
from aiohttp import WSMsgType, web

from ..media import MediaError
from ..pose import PoseError
from ..rollout import RolloutError
from .engine import Engine, EngineError
from .keys import KeySampler
from .protocol import (
    MAX_PROMPT_CHARS,
    MAX_TEXT_BYTES,
    MAX_UPLOAD_BYTES,
    Keys,
    Look,
    Played,
    ProtocolError,
    Reset,
    Start,
    pack_frame,
    parse_client_message,
)

log = logging.getLogger(__name__)

FPS = 16
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
STATIC_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
# The page loads only its own files; frames are blob: images; the token must not leak in a Referer.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
                               "style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
JIT_MARGIN_S = 0.15  # slack before the playing chunk runs out (sending, decoding on the page)
GENERATE_EMA = 0.3  # weight of the newest chunk in the expected generation time
BUSY_MESSAGE = "another player is using this GPU; try again when they have left"


def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` keeps the server on this machine."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServeOptions:
    token: str | None = None
    lead: int = 1  # chunks generated ahead of the one playing
    jpeg_quality: int = 85
    idle_timeout_s: float = 600.0
    heartbeat_s: float = 30.0


def encode_jpegs(frames, quality: int) -> list[bytes]:
    """uint8 ``[T, H, W, 3]`` frames -> JPEG bytes each."""
    from PIL import Image

    out = []
    for frame in np.asarray(frames):
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def minimap_path(c2w: np.ndarray) -> list[list[float]]:
    """Per latent: the camera's ground-plane position (x, z) and heading (radians, 0 = +z, + toward
    +x), for the page's top-down map."""
    return [[round(float(T[0, 3]), 4), round(float(T[2, 3]), 4), round(math.atan2(T[0, 2], T[2, 2]), 4)]
            for T in c2w]


class Server:
    """The app around one :class:`~worldplay.serve.engine.Engine`.

    ``records`` lists what each chunk was generated with (world, chunk, keys, label, seq),
    newest last."""

    def __init__(self, engine: Engine, options: ServeOptions = ServeOptions()):
        self.engine = engine
        self.options = options
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="worldplay-model")
        self.jpeg_thread = ThreadPoolExecutor(1, thread_name_prefix="worldplay-jpeg")
        self.upload_thread = ThreadPoolExecutor(1, thread_name_prefix="worldplay-upload")
        self.active: Player | None = None
        self.records: deque[dict] = deque(maxlen=100_000)
        self.worlds = 0
        self.app = self._make_app()

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=MAX_UPLOAD_BYTES)
        app.router.add_get("/", self._page)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/ws", self._websocket)
        app.router.add_post("/api/upload", self._upload)
        app.on_shutdown.append(self._on_shutdown)
        return app

    # -- HTTP ------------------------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        host = (request.url.host or "").strip("[]")
        if self.options.token is None and host not in LOOPBACK_NAMES:
            return _refuse(403, f"this server answers only to localhost, not {host[:80]!r} (start it with --token "
                                "to serve other names)")
        private = request.path == "/ws" or request.path.startswith("/api/")
        if private and self.options.token is not None and not self._token_ok(request):
            return _refuse(401, "missing or wrong token; open the page with ?token=YOUR_TOKEN")
        if private and not _same_origin(request):
            return _refuse(403, "cross-origin requests are refused")
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = exc
        response.headers.update(SECURITY_HEADERS)
        return response

    def _token_ok(self, request: web.Request) -> bool:
        given = request.query.get("token", "")
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            given = auth[len("Bearer "):]
        return hmac.compare_digest(given.encode(), self.options.token.encode())

    async def _page(self, request: web.Request) -> web.Response:
        return await self._file("index.html")

    async def _static(self, request: web.Request) -> web.Response:
        return await self._file(request.match_info["name"])

    async def _file(self, name: str) -> web.Response:
        if name not in STATIC_FILES:
            raise web.HTTPNotFound(text="no such file")
        body = resources.files(__package__).joinpath("static", name).read_bytes()
        return web.Response(body=body, content_type=STATIC_FILES[name], charset="utf-8")

    async def _upload(self, request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > MAX_UPLOAD_BYTES:
            return _refuse(413, f"the upload is {request.content_length} bytes; the limit is {MAX_UPLOAD_BYTES}")
        try:
            data = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _refuse(413, f"the upload is over the {MAX_UPLOAD_BYTES}-byte limit")
        if not data:
            return _refuse(400, "the upload is empty; send the image file as the request body")
        ident = secrets.token_hex(16)
        loop = asyncio.get_running_loop()
        try:
            width, height = await loop.run_in_executor(self.upload_thread, self.engine.add_upload, ident, data)
        except EngineError as exc:
            return _refuse(400, str(exc))
        return web.json_response({"upload": ident, "width": width, "height": height})

    # -- WebSocket -------------------------------------------------------------------------------

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_TEXT_BYTES, heartbeat=self.options.heartbeat_s)
        await ws.prepare(request)
        if self.active is not None:
            await ws.send_json({"type": "busy", "message": BUSY_MESSAGE})
            await ws.close(code=1013, message=b"busy")  # 1013: try again later
            return ws
        player = self.active = Player(self, ws)
        try:
            await player.run()
        finally:
            await player.stop()
            self.active = None
        return ws

    async def _on_shutdown(self, app) -> None:
        if self.active is not None:
            await self.active.ws.close(code=1001, message=b"server shutting down")

    def hello(self) -> dict:
        e = self.engine
        return {"type": "hello", "samples": list(e.samples), "size": list(e.size), "fps": FPS,
                "max_chunks": e.max_chunks, "random_weights": e.random_weights, "lead": self.options.lead,
                "limits": {"upload_bytes": MAX_UPLOAD_BYTES, "prompt_chars": MAX_PROMPT_CHARS,
                           "message_bytes": MAX_TEXT_BYTES}}

    def close(self) -> None:
        for pool in (self.model_thread, self.jpeg_thread, self.upload_thread):
            pool.shutdown(wait=True)
        self.engine.close()


def _refuse(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _same_origin(request: web.Request) -> bool:
    """A browser names the page that opened a request in Origin; only this server's own page may
    drive it (clients that are not browsers send no Origin)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return origin in (f"http://{request.host}", f"https://{request.host}")


class Player:
    """One connected page: reads its messages, steps the engine, streams the chunks back."""

    def __init__(self, server: Server, ws: web.WebSocketResponse):
        self.server, self.ws, self.engine = server, ws, server.engine
        self.sampler = KeySampler()
        self.world = 0  # the page's current world id (0: none yet)
        self.played = -1  # last chunk of this world the page started showing
        self.pending_start: Start | None = None
        self.pending_reset = False
        self.full = False
        self.played_at: dict[int, float] = {}  # chunk -> when the page said it started showing it
        self.frames_of: dict[int, int] = {}  # chunk -> its frames (13 for chunk 0, then 16)
        self.expected_generate_s: float | None = None
        self._wake: asyncio.TimerHandle | None = None
        self.changed = asyncio.Event()
        self.outbox: asyncio.Queue = asyncio.Queue()

    async def run(self) -> None:
        await self.ws.send_json(self.server.hello())
        try:
            await self._run_tasks()
        finally:
            if self._wake is not None:
                self._wake.cancel()

    async def _run_tasks(self) -> None:
        tasks = [asyncio.create_task(t) for t in (self._read(), self._play(), self._send())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = None if task.cancelled() else task.exception()
                if error is not None and not isinstance(error, ConnectionError):  # a page gone mid-send
                    raise error
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def stop(self) -> None:
        """After the page has gone: the model thread finishes what it runs (at most the chunk in
        flight), then the GPU is free for the next player."""
        await asyncio.wrap_future(self.server.model_thread.submit(lambda: None))
        if not self.ws.closed:
            await self.ws.close()

    async def _model(self, fn, *args):
        return await asyncio.wrap_future(self.server.model_thread.submit(fn, *args))

    async def _fail(self, message: str, code: int = 1008) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.ws.send_json({"type": "error", "message": message, "fatal": True})
        await self.ws.close(code=code, message=message[:120].encode())

    # -- reading -----------------------------------------------------------------------------

    async def _read(self) -> None:
        while True:
            try:
                msg = await self.ws.receive(timeout=self.server.options.idle_timeout_s)
            except TimeoutError:
                await self._fail(f"no message for {self.server.options.idle_timeout_s:g} s; the world was closed "
                                 "(reload the page to play again)", code=1000)
                return
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return
            if msg.type == WSMsgType.ERROR:
                # e.g. a message over max_msg_size: aiohttp has closed the socket (1009)
                log.info("websocket error: %s", self.ws.exception())
                return
            try:
                message = parse_client_message(msg.data if msg.type == WSMsgType.TEXT else bytes(msg.data))
            except ProtocolError as exc:
                await self._fail(f"protocol error: {exc}")
                return
            self._handle(message)

    def _handle(self, message) -> None:
        if isinstance(message, Keys):
            self.sampler.keys(message.down, message.seq)
        elif isinstance(message, Look):
            self.sampler.look(message.dx, message.dy, message.seq)
        elif isinstance(message, Played):
            if message.world == self.world and message.chunk > self.played:
                self.played = message.chunk
                self.played_at[message.chunk] = time.perf_counter()
        elif isinstance(message, Reset):
            self.pending_reset = True
        elif isinstance(message, Start):
            self.pending_start = message
        self.changed.set()

    # -- generating --------------------------------------------------------------------------

    async def _play(self) -> None:
        try:
            while True:
                await self.changed.wait()
                self.changed.clear()
                while await self._advance():
                    pass
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as exc:  # the model failed (e.g. out of GPU memory): say so, end this world
            log.exception("generation failed")
            await self._fail(f"the model failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                             "reload the page to start again", code=1011)

    async def _advance(self) -> bool:
        """Do the next thing there is to do (start, reset, one chunk); False when waiting."""
        if self.pending_start is not None:
            start, self.pending_start = self.pending_start, None
            await self._start(start)
            return True
        if self.pending_reset and self.world:
            self.pending_reset = False
            await self._model(self.engine.restart)
            self._new_world()
            await self.ws.send_json({"type": "started", "world": self.world, "size": list(self.engine.size)})
            return True
        self.pending_reset = False
        if not self.world or self.full:
            return False
        chunk = self.engine.chunk
        lead = self.server.options.lead
        if chunk - self.played > lead:
            return False  # the page is still showing earlier chunks
        wait = self._until_due(chunk, lead)
        if wait > 0:
            if self._wake is None:
                self._wake = asyncio.get_running_loop().call_later(wait, self._woken)
            return False
        if chunk >= self.engine.max_chunks:
            self.full = True
            await self.ws.send_json({"type": "full", "message": f"this world reached its {self.engine.max_chunks}"
                                     "-chunk limit; press R to start over"})
            return False
        await self._step()
        return True

    def _until_due(self, chunk: int, lead: int) -> float:
        """Seconds until chunk ``chunk`` should start: the chunks ahead of it (those since
        ``chunk - lead``, which the page has started showing) must not run out before it is made."""
        since = self.played_at.get(chunk - lead)
        if since is None or self.expected_generate_s is None:
            return 0.0
        playback_s = sum(self.frames_of.get(c, 16) for c in range(chunk - lead, chunk)) / FPS
        return since + playback_s - self.expected_generate_s - JIT_MARGIN_S - time.perf_counter()

    def _woken(self) -> None:
        self._wake = None
        self.changed.set()

    async def _start(self, start: Start) -> None:
        try:
            if start.sample is not None:
                image = await self._model(self.engine.sample_image, start.sample)
            else:
                image = await self._model(self.engine.upload_image, start.upload)
            await self._model(self.engine.begin, image, start.prompt)
        except (EngineError, MediaError, PoseError, RolloutError) as exc:
            await self.ws.send_json({"type": "error", "message": str(exc).splitlines()[0], "fatal": False})
            return
        self._new_world()
        await self.ws.send_json({"type": "started", "world": self.world, "size": list(self.engine.size)})

    def _new_world(self) -> None:
        self.server.worlds += 1
        self.world = self.server.worlds
        self.played = -1
        self.played_at.clear()
        self.frames_of.clear()
        self.full = False

    async def _step(self) -> None:
        sample = self.sampler.sample()
        world = self.world
        t0 = time.perf_counter()
        out, c2w = await self._model(self.engine.step, sample.motion)
        generate_ms = (time.perf_counter() - t0) * 1e3
        seconds = generate_ms / 1e3
        self.expected_generate_s = seconds if self.expected_generate_s is None else (
            GENERATE_EMA * seconds + (1 - GENERATE_EMA) * self.expected_generate_s)
        # started_s / finished_s (time.perf_counter()) let an in-process client see when the model
        # worked relative to playback (the interactive experiment's overlap measure).
        record = {"world": world, "chunk": out.index, "keys": list(sample.keys), "label": sample.motion.label,
                  "translation": sample.motion.translation, "rotation": sample.motion.rotation, "seq": sample.seq,
                  "dx": sample.dx, "dy": sample.dy, "started_s": t0, "finished_s": t0 + seconds}
        self.server.records.append(record)
        self.frames_of[out.index] = int(out.frames.shape[0])
        await self.outbox.put((record, out, c2w, generate_ms))

    # -- sending -----------------------------------------------------------------------------

    async def _send(self) -> None:
        loop = asyncio.get_running_loop()
        quality = self.server.options.jpeg_quality
        while True:
            record, out, c2w, generate_ms = await self.outbox.get()
            if record["world"] != self.world:
                continue  # the world started over since this chunk was made
            jpegs = await loop.run_in_executor(self.server.jpeg_thread, encode_jpegs, out.frames.numpy(), quality)
            await self.ws.send_json({
                "type": "chunk", **{k: record[k] for k in ("world", "chunk", "keys", "label", "seq")},
                "motion": {"translation": record["translation"], "rotation": record["rotation"]},
                "frames": len(jpegs), "poses": minimap_path(c2w), "generate_ms": round(generate_ms, 1),
                "timings_ms": {k: round(v, 1) for k, v in out.timings_ms.items()},
            })
            for i, jpeg in enumerate(jpegs):
                await self.ws.send_bytes(pack_frame(record["world"], record["chunk"], i, len(jpegs), jpeg))


# -- running ---------------------------------------------------------------------------------------


class RunningServer:
    """A server on its own event loop in a background thread (tests, the scripted client's
    self-test); ``url`` is where it listens."""

    def __init__(self, server: Server, host: str = "127.0.0.1", port: int = 0):
        self.server = server
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(host, port), daemon=True, name="worldplay-serve")
        self._error: BaseException | None = None
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise self._error
        self.url = f"http://{host}:{self.port}"

    def _run(self, host: str, port: int) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._runner = web.AppRunner(self.server.app, handle_signals=False)
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, host, port)
            self._loop.run_until_complete(site.start())
            self.port = self._runner.addresses[0][1]
        except BaseException as exc:  # reported to the constructor
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def call(self, fn):
        """Run ``fn()`` on the server's loop (it may inspect or change server state)."""
        async def wrapped():
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapped(), self._loop).result(30)

    def stop(self) -> None:
        """Stop listening, end the loop, close the server (waits for a chunk in flight)."""
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(60)
        self.server.close()


def serve_forever(server: Server, host: str, port: int, announce=None) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM); ``announce(port)`` once listening (the port
    actually bound: ``port`` 0 picks a free one)."""

    async def main() -> None:
        runner = web.AppRunner(server.app, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
            if announce is not None:
                announce(runner.addresses[0][1])
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(main())
    finally:
        server.close()
