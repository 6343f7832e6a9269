"""``bench``: per-chunk, per-stage timings of every leg, steady-state statistics, ratios between
legs from the same run, peak memory, and each stage's FLOP floor at the matmul rate measured in
the same run.

Order: the matmul rate, then the native legs (models loaded once; the legs alternate within
each repetition so that slow drifts of the machine hit them alike), then the official leg
(after the native models are freed; it must come last, see ``official_leg``).
"""

from __future__ import annotations

import gc
import logging
import time
from collections import defaultdict
from typing import Any

import torch

from ..context import KindOutput, RunContext
from ..flops import measure_matmul_rate, memory_latents, stage_flops
from ..legs import (
    LegChunk,
    load_models,
    native_leg,
    native_rollout,
    peak_memory,
    pipelined_native_rollout,
    predicted_memory,
    prepare_image,
    prompt_for,
    ranked_native_rollout,
    text_states,
    trajectory_for,
)
from ..schema import OFFICIAL_LEG, OFFICIAL_RANKED_LEGS, PIPELINED_LEGS, RANKED_LEGS, BenchConfig, ranks_of
from ..stats import summarize

log = logging.getLogger(__name__)

RATIO_STAGES = ("prefill", "steps", "dit", "decode", "total")
FLOOR_STAGES = ("prefill", "step0", "steps", "dit", "decode", "total")


def run(ctx: RunContext) -> KindOutput:
    cfg: BenchConfig = ctx.config  # type: ignore[assignment]
    height, width = cfg.resolution
    rate = measure_matmul_rate(ctx.device)
    log.info("matmul rate: %s", rate)
    image_path, image_identity = prepare_image(cfg.image, cfg, ctx.manifest, ctx.scratch)
    prompt, prompt_source = prompt_for(cfg.image, ctx.manifest)
    trajectory = trajectory_for(cfg.pose, cfg.num_chunk, ctx.manifest)
    text, text_identity = text_states(cfg, prompt, ctx.device)
    flops = [stage_flops(cfg.preset, height, width, c, int(text.shape[1])) for c in range(cfg.num_chunk)]

    timings: dict[str, list[tuple[int, LegChunk]]] = defaultdict(list)  # leg -> (repetition, chunk)
    legs: dict[str, dict[str, Any]] = {}
    provenance: dict[str, Any] = {"image": image_identity, "text": {**text_identity, "prompt_source": prompt_source},
                                  "trajectory": trajectory.source}
    # Legs of several processes (the two-GPU pipeline, N ranks) load their own models.
    pipelined = [name for name in cfg.legs if name in PIPELINED_LEGS or name in RANKED_LEGS]
    official_ranked = [name for name in cfg.legs if name in OFFICIAL_RANKED_LEGS]
    native = [name for name in cfg.legs if name != OFFICIAL_LEG and name not in pipelined + official_ranked]
    models = None
    if native or cfg.needs_official:
        models = load_models(cfg.weights, cfg.preset, ctx.device, provenance)
    for name in native + pipelined:
        leg = native_leg(name, ctx.device.type)
        legs[name] = {"status": "ok", "kind": "native", "settings": leg.describe(cfg), "peak_memory": {},
                      "rollout_wall_s": []}
        if name not in PIPELINED_LEGS:  # one device, or one GPU of N ranks (the pipeline's two differ)
            legs[name]["memory_plan"] = predicted_memory(leg, cfg)
    for rep in range(cfg.repetitions):
        for name in native:
            if legs[name]["status"] != "ok":
                continue
            accel: dict = {}
            leg = native_leg(name, ctx.device.type)
            stream = native_rollout(models, leg, cfg, image_path, text, trajectory,
                                    ctx.device, desc=f"{name} rep {rep + 1}/{cfg.repetitions}",
                                    progress=ctx.progress, accel_out=accel)
            try:
                with peak_memory(ctx.device) as peak:
                    _record_rollout(legs[name], timings[name], rep, stream, accel)
            except torch.OutOfMemoryError as exc:
                if leg.memory_cap_gib is None:
                    raise
                # A mode that does not fit its card is a result, not the end of the bench.
                stream.close()
                legs[name].update(status="out of memory", error=f"under the {leg.memory_cap_gib} GiB cap: "
                                                                f"{str(exc).splitlines()[0]}")
                timings.pop(name, None)
            _merge_peak(legs[name]["peak_memory"], peak)
            _free(ctx.device)  # the next leg starts from an empty cache (fragmentation caused OOMs)

    official_weights = None
    if cfg.needs_official and not ctx.skip_official:
        from .. import official_leg

        official_weights = official_leg.weights_dir(models, cfg, ctx.scratch)
    # The two-GPU legs load their own models in their own processes: free this one's first.
    models = None
    _free(ctx.device)
    for rep in range(cfg.repetitions):
        for name in pipelined:
            accel, memory, traffic = {}, {}, {}
            leg = native_leg(name, ctx.device.type)
            if name in RANKED_LEGS:
                stream = ranked_native_rollout(cfg.weights, leg, cfg, image_path, text, trajectory, accel_out=accel,
                                               memory_out=memory, traffic_out=traffic)
            else:
                stream = pipelined_native_rollout(cfg.weights, leg, cfg, image_path, text, trajectory,
                                                  accel_out=accel, memory_out=memory)
            _record_rollout(legs[name], timings[name], rep, stream, accel)
            legs[name]["ranks"] = ranks_of(name)
            legs[name]["devices"] = (list(memory) if name in RANKED_LEGS
                                     else ["cuda:0 (DiT)", "cuda:1 (VAE decode)"])
            if traffic:
                legs[name]["traffic_bytes"] = traffic  # per rank, every chunk of the rollout
            for rank, peak in memory.items():  # per rank: each process measures its own device
                _merge_peak(legs[name]["peak_memory"].setdefault(rank, {}), peak)
    if OFFICIAL_LEG in cfg.legs:
        if ctx.skip_official:
            legs[OFFICIAL_LEG] = {"status": "skipped", "reason": _skip_reason(ctx)}
        else:
            legs[OFFICIAL_LEG] = _run_official(ctx, cfg, official_weights, image_path, text, trajectory, timings,
                                               provenance)
    for name in official_ranked:  # after the one-process official leg, in processes of their own
        if ctx.skip_official:
            legs[name] = {"status": "skipped", "reason": _skip_reason(ctx)}
        else:
            legs[name] = _run_official_ranked(ctx, cfg, name, official_weights, image_path, text, trajectory,
                                              timings)
    _free(ctx.device)

    rows = []
    for name, items in timings.items():
        for rep, chunk in items:
            for stage, ms in chunk.timings_ms.items():
                rows.append({"leg": name, "repetition": rep, "chunk": chunk.index, "stage": stage,
                             "ms": round(float(ms), 4), "flops": flops[chunk.index].get(stage),
                             "memory_latents": memory_latents(chunk.index),
                             "steady": chunk.index >= cfg.warmup_chunks})
        legs[name].update(_leg_summary(items, cfg, flops, rate))
    summary = {
        "matmul_rate": rate,
        "steady_state": {"chunks": list(range(cfg.warmup_chunks, cfg.num_chunk)), "warmup_chunks": cfg.warmup_chunks,
                         "repetitions": cfg.repetitions,
                         "definition": "per stage: median, p10, p90 over every steady chunk of every repetition"},
        "stage_definitions": {
            "prefill": "memory K/V prefill forward", "steps": "the 4 denoising forwards",
            "dit": "prefill + steps (+ kv_move in reuse mode)", "decode": "VAE decode of the chunk's 4 latents",
            "total": "dit + decode (N-rank legs: timed on rank 0); two-GPU legs: pipelined", "kv_move": "reuse mode: moving and re-rotating "
            "the kept memory K/V", "interval": "two-GPU legs: time between consecutive chunks' frames reaching "
            "the host", "sent_interval": "two-GPU legs: time between consecutive chunks' latents leaving GPU 0",
            "pipelined": "two-GPU legs: max(interval, sent_interval), the sustained time per chunk",
            "recv_wait": "two-GPU legs: GPU time the decoder waited for the latents (0: it is the bottleneck)",
            "select": "native memory-frame selection (not in total)",
            "dit_call": "official: the whole pipeline call (selection, host work, prefill, steps)",
        },
        "legs": legs,
        "ratios": _ratios(legs),
        "flop_floor": _floor(flops, cfg, rate),
    }
    return KindOutput(summary=summary, chunk_rows=rows, provenance=provenance)


def _record_rollout(entry: dict[str, Any], into: list, rep: int, stream, accel: dict) -> None:
    """Run one rollout of a native leg (``stream`` yields its chunks and fills ``accel`` at the
    end): keep its chunks' timings, its accel counters and its wall time."""
    t0 = time.perf_counter()
    for chunk in stream:
        into.append((rep, _light(chunk)))
    entry.setdefault("accel", []).append(accel)
    entry["rollout_wall_s"].append(round(time.perf_counter() - t0, 3))


def _light(chunk: LegChunk) -> LegChunk:
    """Drop frames and latents: a bench keeps timings and memory selections only."""
    return LegChunk(chunk.index, frames=chunk.frames[:0], latents=chunk.latents[:0], timings_ms=chunk.timings_ms,
                    memory_indices=chunk.memory_indices, retrieved_clip=chunk.retrieved_clip, extra=chunk.extra)


def _merge_peak(into: dict[str, Any], peak: dict[str, Any]) -> None:
    for key, value in peak.items():
        into[key] = max(into.get(key, value), value) if isinstance(value, (int, float)) else value


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _skip_reason(ctx) -> str:
    from ..runner import SKIPPED_BY_FLAG

    return ctx.official_skip_reason or SKIPPED_BY_FLAG


def _run_official(ctx, cfg, weights, image_path, text, trajectory, timings, provenance) -> dict[str, Any]:
    from .. import official_leg
    from ..provenance import official_checkout

    t0 = time.perf_counter()
    runner = official_leg.OfficialRunner(ctx.official_root, weights, ctx.device, cfg.official_compile)
    out: dict[str, Any] = {"status": "ok", "kind": "official", "load_s": round(time.perf_counter() - t0, 3),
                           "settings": {"compile": cfg.official_compile}, "peak_memory": {}, "rollout_wall_s": []}
    provenance["official"] = {**(official_checkout(ctx.official_root) or {}), "environment": runner.environment()}
    for rep in range(cfg.repetitions):
        t0 = time.perf_counter()
        with peak_memory(ctx.device) as peak:
            for chunk in runner.rollout(cfg, image_path, text, trajectory, desc=f"official rep {rep + 1}",
                                        progress=ctx.progress):
                timings[OFFICIAL_LEG].append((rep, _light(chunk)))
        out["rollout_wall_s"].append(round(time.perf_counter() - t0, 3))
        _merge_peak(out["peak_memory"], peak)
    runner.close()
    return out


def _run_official_ranked(ctx, cfg, name, weights, image_path, text, trajectory, timings) -> dict[str, Any]:
    from .. import official_leg

    ranks = ranks_of(name)
    out: dict[str, Any] = {"status": "ok", "kind": "official", "ranks": ranks, "settings": {"compile": cfg.official_compile},
                           "peak_memory": {}, "rollout_wall_s": []}
    for rep in range(cfg.repetitions):
        t0 = time.perf_counter()
        peaks: dict = {}
        for chunk in official_leg.ranked_rollout(ctx.official_root, weights, cfg, image_path, text, trajectory,
                                                 ranks=ranks, compile=cfg.official_compile, peaks_out=peaks):
            timings[name].append((rep, _light(chunk)))
        out["rollout_wall_s"].append(round(time.perf_counter() - t0, 3))
        for rank, peak in peaks.items():
            _merge_peak(out["peak_memory"].setdefault(rank, {}), peak)
        out["devices"] = list(peaks)
    return out


def _leg_summary(items: list[tuple[int, LegChunk]], cfg: BenchConfig, flops, rate) -> dict[str, Any]:
    steady = [c for _, c in items if c.index >= cfg.warmup_chunks]
    stages = sorted({s for c in steady for s in c.timings_ms})
    steady_ms = {s: summarize(c.timings_ms[s] for c in steady if s in c.timings_ms) for s in stages}
    per_chunk = {
        s: [summarize(c.timings_ms.get(s, 0.0) for _, c in items if c.index == k)["median"] for k in range(cfg.num_chunk)]
        for s in ("dit", "decode", "total")
    }
    first = next(c for rep, c in items if rep == 0 and c.index == 0)
    achieved = {}
    for stage in FLOOR_STAGES:
        med = steady_ms.get(stage, {}).get("median")
        work = sum(flops[c.index].get(stage, 0.0) for c in steady) / max(len(steady), 1)
        if med and work:
            tflops = work / (med / 1e3) / 1e12
            achieved[stage] = {"tflops": round(tflops, 4), "fraction_of_matmul_rate": round(tflops / rate["median_tflops"], 4)}
    return {
        "steady_ms": steady_ms,
        "per_chunk_median_ms": per_chunk,
        "cold_chunk0_ms": {s: round(first.timings_ms[s], 3) for s in ("dit", "decode", "total")},
        "achieved": achieved,
        "retrieved_clips": {str(c.index): c.retrieved_clip for rep, c in items if rep == 0 and c.index >= 4},
        # the latents each chunk attended to, as the run selected them (the site plots these)
        "memory_indices": {str(c.index): c.memory_indices for rep, c in items
                           if rep == 0 and c.memory_indices is not None},
    }


def _ratios(legs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``"A / B"``: A's steady median time over B's, per stage (> 1: B is faster), for every
    pair of legs measured in this run."""
    ok = [name for name, leg in legs.items() if leg.get("status") == "ok"]
    out: dict[str, Any] = {}
    for i, a in enumerate(ok):
        for b in ok[i + 1:]:
            pair = {}
            for stage in RATIO_STAGES:
                ma = legs[a]["steady_ms"].get(stage, {}).get("median")
                mb = legs[b]["steady_ms"].get(stage, {}).get("median")
                if ma and mb:
                    pair[stage] = round(ma / mb, 4)
            out[f"{a} / {b}"] = pair
    return out


def _floor(flops, cfg: BenchConfig, rate) -> dict[str, Any]:
    steady = range(cfg.warmup_chunks, cfg.num_chunk)
    tflops = rate["median_tflops"]
    out: dict[str, Any] = {"rate_tflops": tflops, "rate_label": rate["label"],
                           "definition": "stage FLOPs (mean over steady chunks) / the matmul rate measured in this run"}
    for stage in FLOOR_STAGES:
        work = sum(flops[k].get(stage, 0.0) for k in steady) / len(steady)
        out[stage] = {"tflop": round(work / 1e12, 6), "floor_ms": round(work / (tflops * 1e12) * 1e3, 4)}
    return out
