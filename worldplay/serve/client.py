"""A scripted player for ``worldplay serve``: connects, starts a world, holds keys on a schedule,
and measures what a player would see.

It plays the frames back like the page does (at the stream's frame rate, from a queue, telling
the server when each chunk starts playing), so the server's flow control runs as it does for a
browser. Keys change at a time after the world started (``2.5:w``) or when a given frame of a
given chunk is shown (``c3f8:left``: frame 8 of chunk 3; ``c3`` is its first frame), so that a
script lands at the same point of playback on a fast and on a slow machine. Per run it reports
(definitions in :mod:`worldplay.serve.measure`):

* ``latencies_s``: for each key change, the time from sending it to showing the first frame of
  the first chunk generated with it (the server echoes the last key change each chunk saw);
* ``sustained_fps``: frames shown per second from the second chunk on (chunk 0 includes the
  start-up: compiles, the first prefill);
* ``stalls`` / ``stall_s``: how often, and for how long in all, playback waited for a frame
  (a gap between shown frames over 1.5 frame periods);
* ``chunks``: what the server generated each chunk with (keys, label, seq, timings);
* ``arrivals``: every frame's chunk, index, arrival and playback time (s since the world started).

    python -m worldplay.serve.client http://127.0.0.1:8765 --schedule "0:w,c3:w+left,c6f8:" --chunks 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field

from . import measure
from .protocol import KEYS, unpack_frame

__all__ = ["ClientError", "ClientReport", "Hold", "parse_schedule", "play", "run"]


class ClientError(RuntimeError):
    """The server refused or ended the session (busy, error, closed); the message says which."""


@dataclass(frozen=True)
class Hold:
    """From ``at_s`` seconds after the world started, or from when frame ``at_frame`` of chunk
    ``at_chunk`` is shown, hold exactly ``keys`` (empty: release all)."""

    at_s: float | None
    keys: frozenset[str]
    at_chunk: int | None = None
    at_frame: int = 0


def parse_schedule(text: str) -> list[Hold]:
    """``"0:w,3:w+left,c5f8:"`` -> holds at 0 s (w), 3 s (w and left), and from frame 8 of chunk
    5 on nothing. Time-triggered holds come first in time order, then chunk-triggered ones in
    playback order."""
    holds = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        at, _, keys = item.partition(":")
        names = frozenset(k for k in keys.split("+") if k)
        if not names <= KEYS:
            raise ValueError(f"schedule item {item!r}: keys must be among {', '.join(sorted(KEYS))}")
        if at.startswith("c"):
            chunk, _, frame = at[1:].partition("f")
            if not chunk.isdigit() or not (frame.isdigit() or frame == "") or (frame and int(frame) >= 16):
                raise ValueError(f"schedule item {item!r}: write cCHUNK or cCHUNKfFRAME (frame 0-15), e.g. c3f8:left")
            holds.append(Hold(None, names, int(chunk), int(frame or 0)))
            continue
        try:
            at_s = float(at)
        except ValueError:
            raise ValueError(f"schedule item {item!r}: write SECONDS:KEY+KEY or cCHUNKfFRAME:KEY+KEY, e.g. "
                             "2.5:w+left or c3f8:left") from None
        if not at_s >= 0 or at_s == float("inf"):
            raise ValueError(f"schedule item {item!r}: the time must be a finite number of seconds >= 0")
        holds.append(Hold(at_s, names))
    timed = sorted((h for h in holds if h.at_s is not None), key=lambda h: h.at_s)
    played = sorted((h for h in holds if h.at_s is None), key=lambda h: (h.at_chunk, h.at_frame))
    return timed + played


@dataclass
class ClientReport:
    frames: int = 0
    latencies_s: list[float] = field(default_factory=list)
    sustained_fps: float | None = None
    stalls: int = 0
    stall_s: float = 0.0
    chunks: list[dict] = field(default_factory=list)
    key_changes: list[dict] = field(default_factory=list)  # seq, keys, sent_s (since the world started)
    arrivals: list[dict] = field(default_factory=list)  # chunk, frame, arrived_s, shown_s (since the world started)
    latency: list[dict] = field(default_factory=list)  # per key change: seq, keys, sent_s, chunk, latency_s
    origin_s: float = 0.0  # time.perf_counter() when the world started: the origin of the times above

    def to_dict(self) -> dict:
        return asdict(self)


async def play(url: str, schedule: list[Hold], *, chunks: int = 8, sample: str = "synthetic", prompt: str = "",
               token: str | None = None, timeout_s: float = 600.0) -> ClientReport:
    """Play one world of ``chunks`` chunks on the server at ``url`` (``http://host:port``)."""
    import aiohttp

    report = ClientReport()
    params = {"token": token} if token else None
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{url}/ws", params=params,
                                                                 max_msg_size=0) as ws:
        hello = await _next_json(ws, timeout_s)
        if hello.get("type") != "hello":
            raise ClientError(f"the server said {hello.get('type')}: {hello.get('message', '')}")
        fps = hello["fps"]
        await ws.send_json({"type": "start", "image": {"sample": sample}, "prompt": prompt})
        started = await _next_json(ws, timeout_s)
        if started.get("type") != "started":
            raise ClientError(f"the world did not start: {started.get('message', started)}")
        world, t0 = started["world"], time.perf_counter()
        report.origin_s = t0
        frames: asyncio.Queue = asyncio.Queue()
        infos: dict[int, dict] = {}
        changes: list[measure.KeyChange] = []
        arrivals: list[measure.Arrival] = []
        shown_at: list[float] = []
        waiting = [h for h in schedule if h.at_s is None]  # chunk-triggered holds, in playback order

        async def send_keys(hold: Hold) -> None:
            seq = len(changes) + 1
            changes.append(measure.KeyChange(seq, hold.keys, time.perf_counter() - t0))
            await ws.send_json({"type": "keys", "down": sorted(hold.keys), "seq": seq})

        async def press() -> None:
            for hold in (h for h in schedule if h.at_s is not None):
                await asyncio.sleep(max(0.0, t0 + hold.at_s - time.perf_counter()))
                await send_keys(hold)

        async def receive() -> None:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    w, chunk, index, count, _ = unpack_frame(msg.data)
                    if w == world:
                        await frames.put((chunk, index, count, time.perf_counter() - t0))
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    m = json.loads(msg.data)
                    if m["type"] == "chunk" and m["world"] == world:
                        infos[m["chunk"]] = m
                    elif m["type"] in ("error", "busy", "full"):
                        raise ClientError(f"server {m['type']}: {m['message']}")
                else:
                    break
            raise ClientError("the server closed the connection")

        async def show() -> None:
            # The frames are shown on the schedule of measure.playback (the ideal player); sleeping
            # until each due time keeps the real playback on it (no drift from timer overshoot).
            period = 1.0 / fps
            while True:
                chunk, index, count, arrived = await frames.get()
                arrivals.append(measure.Arrival(chunk, index, arrived))
                due = arrived if not shown_at else max(arrived, shown_at[-1] + period)
                await asyncio.sleep(max(0.0, t0 + due - time.perf_counter()))
                shown_at.append(due)
                if index == 0:
                    await ws.send_json({"type": "played", "world": world, "chunk": chunk})
                    info = infos.get(chunk, {})
                    report.chunks.append({k: info.get(k) for k in ("chunk", "keys", "label", "seq", "generate_ms",
                                                                     "timings_ms")})
                while waiting and (waiting[0].at_chunk, waiting[0].at_frame) <= (chunk, index):
                    await send_keys(waiting.pop(0))
                if chunk + 1 >= chunks and index + 1 == count:
                    return

        tasks = [asyncio.create_task(c) for c in (press(), receive(), show())]
        try:
            done, _ = await asyncio.wait(tasks[1:], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                raise ClientError(f"no {chunks} chunks within {timeout_s:g} s")
            for task in done:
                task.result()  # raises what the receiver or player raised
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    _fill(report, arrivals, shown_at, changes, {c["chunk"]: c["seq"] for c in report.chunks if c["chunk"] is not None},
          1.0 / fps)
    return report


def _fill(report: ClientReport, arrivals: list, shown: list[float], changes: list, chunk_seq: dict[int, int],
          period: float) -> None:
    """The report's measures, from the log (worldplay.serve.measure)."""
    report.frames = len(shown)
    report.arrivals = [{"chunk": a.chunk, "frame": a.frame, "arrived_s": a.at_s, "shown_s": t}
                       for a, t in zip(arrivals, shown, strict=True)]
    late = measure.stalls(shown, period)
    report.stalls, report.stall_s = len(late), sum(s for _, s in late)
    report.sustained_fps = measure.sustained_fps(arrivals, shown)
    report.key_changes = [{"seq": c.seq, "keys": sorted(c.keys), "sent_s": c.sent_s} for c in changes]
    report.latency = measure.latencies(changes, chunk_seq, measure.chunk_starts(arrivals, shown))
    report.latencies_s = [row["latency_s"] for row in report.latency if row["latency_s"] is not None]


async def _next_json(ws, timeout_s: float) -> dict:
    import aiohttp

    msg = await ws.receive(timeout=timeout_s)
    if msg.type != aiohttp.WSMsgType.TEXT:
        raise ClientError(f"the server sent {msg.type.name} where a message was expected")
    return json.loads(msg.data)


def run(url: str, schedule: list[Hold] | str, **kwargs) -> ClientReport:
    """:func:`play` from synchronous code; ``schedule`` may be a schedule string."""
    if isinstance(schedule, str):
        schedule = parse_schedule(schedule)
    return asyncio.run(play(url, schedule, **kwargs))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m worldplay.serve.client", description=__doc__.splitlines()[0])
    ap.add_argument("url", help="the server, e.g. http://127.0.0.1:8765")
    ap.add_argument("--schedule", default="0:w", help="SECONDS:KEY+KEY or cCHUNKfFRAME:KEY+KEY items, "
                    "comma-separated (default: 0:w)")
    ap.add_argument("--chunks", type=int, default=8, help="chunks to play (default 8)")
    ap.add_argument("--sample", default="synthetic", help="sample image (default: synthetic)")
    ap.add_argument("--prompt", default="", help="prompt")
    ap.add_argument("--token", default=None, help="the server's token, if it has one")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds before giving up (default 600)")
    ap.add_argument("--json", default=None, help="write the report here (default: print it)")
    args = ap.parse_args(argv)
    try:
        report = run(args.url, parse_schedule(args.schedule), chunks=args.chunks, sample=args.sample,
                     prompt=args.prompt, token=args.token, timeout_s=args.timeout)
    except (ValueError, ClientError, OSError) as exc:
        print(f"worldplay.serve.client: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
              file=sys.stderr)
        return 2
    text = json.dumps(report.to_dict(), indent=1)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
