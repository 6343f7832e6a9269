"""``interactive``: ``worldplay serve`` played by the scripted client, measured as a player sees it.

The server runs in this process (its own event loop and model thread) on 127.0.0.1, on a free
port the OS picks, with a fresh random token; the scripted client (:mod:`worldplay.serve.client`)
connects over a real WebSocket, plays the frames back at 16 fps and tells the server when each
chunk starts playing, so the server's flow control (one chunk generated ahead of the one playing,
started just in time) runs as it does for a browser. With ``warmup_chunks`` a first world of that
many chunks is played and dropped (it pays for the compiles and CUDA-graph captures, as the first
player after ``worldplay serve`` starts does); the measured world then starts over in the warm
session.

Recorded (definitions in :mod:`worldplay.serve.measure`): per key change of the script, the
latency from sending it to showing the first frame of the first chunk generated with it; the
sustained frame rate from chunk 1 on; the stalls (gaps between shown frames over 1.5 frame
periods); per chunk, the generation time and how much of it ran while the previous chunk was
playing (the overlap that keeps the stream continuous); the keys the server sampled for each
chunk against those the script's changes give (replayed through the server's own key sampler);
the peak memory. ``frames.csv`` has every frame's arrival and playback time.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from typing import Any

from ...serve import client, measure
from ...serve.engine import Engine
from ...serve.server import FPS, RunningServer, ServeOptions, Server
from ..context import KindOutput, RunContext
from ..legs import (
    cast_models,
    load_models,
    memory_cap,
    native_leg,
    peak_memory,
    prepare_image,
    prompt_for,
    text_states,
)
from ..schema import InteractiveConfig
from ..stats import summarize

CLIENT_TIMEOUT_S = 1800.0  # a cold first chunk on the GPU compiles the blocks and captures graphs


def run(ctx: RunContext) -> KindOutput:
    cfg: InteractiveConfig = ctx.config  # type: ignore[assignment]
    from ...offload import place_models
    from ...rollout import WorldPlayPipeline

    leg = native_leg(cfg.leg, ctx.device.type)
    holds = client.parse_schedule(cfg.script)
    image_path, image_identity = prepare_image(cfg.image, cfg, ctx.manifest, ctx.scratch)
    prompt, prompt_source = prompt_for(cfg.image, ctx.manifest)
    provenance: dict[str, Any] = {}
    models = load_models(cfg.weights, cfg.preset, ctx.device, provenance)
    text, text_identity = text_states(cfg, prompt, ctx.device)
    provenance["inputs"] = {cfg.image: {**image_identity, "prompt_source": prompt_source, "text": text_identity}}
    # The history is preallocated for every chunk a world may reach (the played ones and those
    # generated ahead), so no world grows it mid-measurement.
    settings = dataclasses.replace(leg.settings(cfg),
                                   num_chunk=max(cfg.num_chunk, cfg.warmup_chunks) + cfg.lead + 1)
    cast_models(models, leg.dtype)
    place_models(models, settings, ctx.device)
    pipe = WorldPlayPipeline(models.dit, models.vae, device=ctx.device, dtype=leg.dtype)
    engine = Engine(pipe, settings, cfg.resolution, lambda _prompt: text, samples={cfg.image: lambda: image_path},
                    max_chunks=settings.num_chunk, seed=cfg.seed, random_weights=cfg.weights.is_random)
    token = secrets.token_urlsafe(24)
    with memory_cap(ctx.device, leg.memory_cap_gib), peak_memory(ctx.device) as peak:
        running = RunningServer(Server(engine, ServeOptions(token=token, lead=cfg.lead)), "127.0.0.1", 0)
        try:
            play = dict(sample=cfg.image, token=token, timeout_s=CLIENT_TIMEOUT_S)
            if cfg.warmup_chunks:
                client.run(running.url, [], chunks=cfg.warmup_chunks, **play)
                _wait_for_free_gpu(running)
            report = client.run(running.url, holds, chunks=cfg.num_chunk, **play)
            world = running.call(lambda: running.server.worlds)
            records = running.call(lambda: [dict(r) for r in running.server.records if r["world"] == world])
        finally:
            running.stop()
    chunk_rows, frame_rows, facts = measure_world(report, records, cfg.num_chunk)
    summary = {
        "target_fps": FPS,
        "definitions": {
            "playback": "a frame is shown when it has arrived and one frame period (1/16 s) after the previous "
                        "one, whichever is later",
            "stall": f"a gap between two shown frames over {measure.STALL_GAP_PERIODS:g} frame periods "
                     f"({measure.STALL_GAP_PERIODS / FPS * 1e3:g} ms); its length is the gap beyond one period",
            "sustained_fps": "frames shown per second from the first frame of chunk 1 to the last frame",
            "latency": "from sending a key change to showing the first frame of the first chunk whose action "
                       "was sampled after the server had the change",
            "overlap": "the share of a chunk's generation that ran while the previous chunk was playing",
            "generate_fps": "16 frames over the median generation time of chunks 1 on (what the GPU could "
                            "sustain without the playback pacing)",
        },
        "script": cfg.script,
        "lead": cfg.lead,
        "warmup_chunks": cfg.warmup_chunks,
        "leg": {"name": cfg.leg, "settings": leg.describe(cfg)},
        "transport": "WebSocket on 127.0.0.1 (a free port, a random token), JPEG frames, in-process server",
        "peak_memory": peak,
        **facts,
    }
    return KindOutput(summary=summary, chunk_rows=chunk_rows, frame_rows=frame_rows, provenance=provenance)


def _wait_for_free_gpu(running: RunningServer, timeout_s: float = CLIENT_TIMEOUT_S) -> None:
    """The warm-up player has left; its chunk in flight ends before the next player is admitted."""
    deadline = time.monotonic() + timeout_s
    while running.call(lambda: running.server.active is not None):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the warm-up player still held the server after {timeout_s:g} s")
        time.sleep(0.05)


def measure_world(report: client.ClientReport, records: list[dict], num_chunk: int
                  ) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Per-chunk rows, per-frame rows and the summary's measures of one played world.

    ``records``: the server's records of that world (keys, seq, started_s/finished_s on the
    client's clock, ``report.origin_s`` being the client's origin)."""
    period = 1.0 / FPS
    arrivals = [measure.Arrival(a["chunk"], a["frame"], a["arrived_s"]) for a in report.arrivals]
    shown = [a["shown_s"] for a in report.arrivals]
    late = dict(measure.stalls(shown, period))
    frame_rows = [{"chunk": a.chunk, "frame": a.frame, "arrived_s": round(a.at_s, 4), "shown_s": round(t, 4),
                   "gap_s": None if i == 0 else round(t - shown[i - 1], 4), "stall": i in late}
                  for i, (a, t) in enumerate(zip(arrivals, shown, strict=True))]
    starts = measure.chunk_starts(arrivals, shown)
    ends = {a.chunk: t + period for a, t in zip(arrivals, shown, strict=True)}  # last frame's end, per chunk
    by_chunk = {r["chunk"]: r for r in records if r["chunk"] < num_chunk}
    changes = [measure.KeyChange(c["seq"], frozenset(c["keys"]), c["sent_s"]) for c in report.key_changes]
    expected = measure.expected_keys(changes, {c: r["seq"] for c, r in by_chunk.items()})
    info = {c["chunk"]: c for c in report.chunks}
    chunk_rows, overlaps, generate = [], [], []
    for chunk in sorted(by_chunk):
        r = by_chunk[chunk]
        began, done = r["started_s"] - report.origin_s, r["finished_s"] - report.origin_s
        overlap = None
        if chunk - 1 in starts:
            ran = max(0.0, min(done, ends[chunk - 1]) - max(began, starts[chunk - 1]))
            overlap = ran / (done - began) if done > began else None
        if chunk >= 1:
            generate.append((done - began) * 1e3)
            if overlap is not None:
                overlaps.append(overlap)
        timings = (info.get(chunk) or {}).get("timings_ms") or {}
        chunk_rows.append({
            "chunk": chunk, "seq": r["seq"], "keys_script": "+".join(expected[chunk]), "keys_server": "+".join(r["keys"]),
            "keys_match": tuple(r["keys"]) == expected[chunk], "label": r["label"],
            "generate_start_s": round(began, 4), "generate_ms": round((done - began) * 1e3, 3),
            "dit_ms": round(sum(v for k, v in timings.items() if k == "prefill" or k.startswith("step")), 3),
            "decode_ms": timings.get("decode"),
            "first_arrival_s": _first(frame_rows, chunk, "arrived_s"), "first_shown_s": round(starts[chunk], 4)
            if chunk in starts else None,
            "overlap": None if overlap is None else round(overlap, 4),
            "stalls": sum(1 for i in late if arrivals[i].chunk == chunk),
        })
    latency = [{**row, "latency_s": None if row["latency_s"] is None else round(row["latency_s"], 4),
                "sent_s": round(row["sent_s"], 4)} for row in report.latency]
    median_ms = summarize(generate)["median"]
    facts = {
        "chunks": len(chunk_rows),
        "frames": report.frames,
        "latency_s": summarize([row["latency_s"] for row in latency if row["latency_s"] is not None], 4),
        "latency": latency,
        "sustained_fps": None if report.sustained_fps is None else round(report.sustained_fps, 3),
        "stalls": len(late),
        "stall_s": round(sum(late.values()), 4),
        "generate_ms": summarize(generate),
        "generate_fps": None if not median_ms else round(16 / (median_ms / 1e3), 2),
        "overlap": summarize(overlaps, 4),
        "actions_match": all(row["keys_match"] for row in chunk_rows),
        "mismatched_chunks": [row["chunk"] for row in chunk_rows if not row["keys_match"]],
    }
    return chunk_rows, frame_rows, facts


def _first(frame_rows: list[dict], chunk: int, key: str) -> float | None:
    return next((row[key] for row in frame_rows if row["chunk"] == chunk), None)
