"""``per-input``: a bench and a parity per sample input, one row per input.

For every image of ``inputs`` the two ``speed_legs`` are timed (steady medians of DiT, decode and
total, and the ratio reference / test) and the two ``parity_legs`` compared frame by frame (mean
|delta| per chunk: the ramp, latent error, memory selections). The reference leg is shared by
both pairs (``official`` on a GPU) and runs once per input: its frames serve the parity, its
timings the ratio. Across inputs the spread of each leg's steady DiT median (max/min - 1 and the
coefficient of variation) says whether speed depends on the input.

Why one kind and not a list of images in bench and parity: one model load and one export of the
weights serve every input (the official leg then loads identical weights once), and a row per
input needs both measurements side by side. The bench and parity machinery is reused as is
(:mod:`..legs`, :mod:`.paired`, :func:`..compare.compare_runs`).

Order: every native leg over every input first (the models loaded once; per input the legs
alternate), keeping only the parity test leg's frames; then the models are freed and the
official leg (if it is the reference) runs over every input, each input compared as soon as its
reference rollout ends. Each input's conditioning frame (exactly what :func:`~worldplay.media.load_image`
gives the model) is kept as a small palette PNG thumbnail, next to how it was resized or cropped.
"""

from __future__ import annotations

import io
import statistics
from typing import Any

import numpy as np

from ..compare import compare_runs
from ..context import KindOutput, RunContext
from ..legs import LegChunk, load_models, prepare_image, prompt_for, text_states, trajectory_for
from ..schema import OFFICIAL_LEG, PerInputConfig
from ..stats import summarize
from . import paired

THUMBNAIL_WIDTH = 320  # px; a 256-colour PNG of a 704x1280 photo at this width is 30-45 KB
THUMBNAIL_DIR = "thumbnails"
SPEED_STAGES = ("prefill", "steps", "dit", "decode", "total")
RATIO_STAGES = ("dit", "decode", "total")


def run(ctx: RunContext) -> KindOutput:
    cfg: PerInputConfig = ctx.config  # type: ignore[assignment]
    height, width = cfg.resolution
    trajectory = trajectory_for(cfg.pose, cfg.num_chunk, ctx.manifest)
    provenance: dict[str, Any] = {"trajectory": trajectory.source, "inputs": {}}
    prepared: dict[str, paired.PairedInputs] = {}
    per_input: dict[str, dict[str, Any]] = {}
    files: dict[str, bytes] = {}
    text_cache: dict[str, tuple] = {}
    for image in cfg.inputs:
        image_path, identity = prepare_image(image, cfg, ctx.manifest, ctx.scratch)
        prompt, prompt_source = prompt_for(image, ctx.manifest)
        if prompt not in text_cache:  # random weights: one seeded embedding for every prompt
            text_cache[prompt] = text_states(cfg, prompt, ctx.device)
        text, text_identity = text_cache[prompt]
        prepared[image] = paired.PairedInputs(image_path, text, trajectory, {})
        provenance["inputs"][image] = {**identity, "prompt_source": prompt_source, "text": text_identity}
        thumbnail = f"{THUMBNAIL_DIR}/{image}.png"
        files[thumbnail] = thumbnail_png(image_path, width, height)
        per_input[image] = {"geometry": _geometry(image_path, width, height), "thumbnail": thumbnail,
                            "prompt_source": prompt_source, "legs": {}}

    reference = cfg.speed_legs[1]
    native = [leg for leg in cfg.legs if leg != OFFICIAL_LEG]
    kept: dict[tuple[str, str], list[LegChunk]] = {}  # (input, parity leg) -> chunks with frames, until compared
    chunks_of: dict[tuple[str, str], list[LegChunk]] = {}  # (input, leg) -> chunks (frames dropped)
    legs: dict[str, dict[str, Any]] = {}
    comparisons: dict[str, tuple[list, list, dict]] = {}
    models = load_models(cfg.weights, cfg.preset, ctx.device, provenance)
    for image in cfg.inputs:
        for name in native:
            chunks, info = paired.run_native(ctx, name, models, prepared[image])
            _record(per_input[image], name, chunks, info, cfg)
            legs.setdefault(name, {"kind": "native", "settings": info["settings"]})
            if name in cfg.parity_legs:
                kept[(image, name)] = chunks
            chunks_of[(image, name)] = [_light(c) for c in chunks]
            paired.free(ctx.device)
        if reference != OFFICIAL_LEG:
            comparisons[image] = compare_runs(kept.pop((image, cfg.parity_legs[0])), kept.pop((image, reference)),
                                              image)
    if reference == OFFICIAL_LEG:
        weights = paired.official_weights(ctx, models)
        models = None
        paired.free(ctx.device)
        runner = paired.make_official_runner(ctx, weights, cfg.official_compile, provenance)
        legs[OFFICIAL_LEG] = {"kind": "official", "settings": {"compile": cfg.official_compile}}
        for image in cfg.inputs:
            chunks, info = paired.run_official(ctx, runner, prepared[image], desc=f"{image} official")
            _record(per_input[image], OFFICIAL_LEG, chunks, info, cfg)
            comparisons[image] = compare_runs(kept.pop((image, cfg.parity_legs[0])), chunks, image)
            chunks_of[(image, OFFICIAL_LEG)] = [_light(c) for c in chunks]
        runner.close()
    models = None
    paired.free(ctx.device)

    chunk_rows: list[dict[str, Any]] = []
    frame_rows: list[dict[str, Any]] = []
    test, _ = cfg.speed_legs
    for image in cfg.inputs:
        rows, frames, parity = comparisons[image]
        chunk_rows += [{"input": image, "row": "parity", **r} for r in rows]
        frame_rows += [{"input": image, **r} for r in frames]
        for name in cfg.legs:
            for c in chunks_of[(image, name)]:
                chunk_rows += [{"input": image, "row": "timing", "leg": name, "chunk": c.index, "stage": stage,
                                "ms": round(float(ms), 4), "steady": c.index >= cfg.warmup_chunks}
                               for stage, ms in c.timings_ms.items() if stage in SPEED_STAGES]
        entry = per_input[image]
        entry["parity"] = parity
        entry["ratio"] = _ratio(entry["legs"], test, reference)
        entry["speed_memory_selection_identical"] = (
            [c.memory_indices for c in chunks_of[(image, test)]]
            == [c.memory_indices for c in chunks_of[(image, reference)]])
    summary = {
        "speed_legs": list(cfg.speed_legs),
        "parity_legs": list(cfg.parity_legs),
        "steady_state": {"chunks": list(range(cfg.warmup_chunks, cfg.num_chunk)), "warmup_chunks": cfg.warmup_chunks,
                         "definition": "per input and leg: median, p10, p90 over the steady chunks of one rollout"},
        "ratio_definition": f"{reference} / {test}: the reference leg's steady median over the test leg's (> 1: the "
                            "test leg is faster)",
        "legs": legs,
        "inputs": per_input,
        "spread": spread(per_input, cfg.speed_legs),
        "regime": "per input: same weights, seed, noise tensor, image file and prompt embeddings for every leg; "
                  "frames compared as uint8 before video encoding",
    }
    return KindOutput(summary=summary, chunk_rows=chunk_rows, frame_rows=frame_rows, provenance=provenance,
                      files=files)


def _light(chunk: LegChunk) -> LegChunk:
    return LegChunk(chunk.index, frames=chunk.frames[:0], latents=chunk.latents[:0], timings_ms=chunk.timings_ms,
                    memory_indices=chunk.memory_indices, retrieved_clip=chunk.retrieved_clip)


def _record(entry: dict[str, Any], name: str, chunks: list[LegChunk], info: dict[str, Any],
            cfg: PerInputConfig) -> None:
    steady = [c for c in chunks if c.index >= cfg.warmup_chunks]
    entry["legs"][name] = {
        "steady_ms": {s: summarize(c.timings_ms[s] for c in steady if s in c.timings_ms) for s in SPEED_STAGES
                      if any(s in c.timings_ms for c in steady)},
        "rollout_wall_s": info["rollout_wall_s"],
        "peak_memory": info["peak_memory"],
        "retrieved_clips": {str(c.index): c.retrieved_clip for c in chunks if c.index >= 4},
    }


def _ratio(legs: dict[str, Any], test: str, reference: str) -> dict[str, float]:
    out = {}
    for stage in RATIO_STAGES:
        t = legs[test]["steady_ms"].get(stage, {}).get("median")
        r = legs[reference]["steady_ms"].get(stage, {}).get("median")
        if t and r:
            out[stage] = round(r / t, 4)
    return out


def spread(per_input: dict[str, dict[str, Any]], legs: tuple[str, ...]) -> dict[str, Any]:
    """Per leg and stage, how much the steady median varies across inputs: min, max, max/min - 1
    and the coefficient of variation (population stdev / mean)."""
    out: dict[str, Any] = {}
    for name in legs:
        out[name] = {}
        for stage in RATIO_STAGES:
            values = [e["legs"][name]["steady_ms"][stage]["median"] for e in per_input.values()
                      if stage in e["legs"].get(name, {}).get("steady_ms", {})]
            if len(values) < 1 or min(values) <= 0:
                continue
            mean = statistics.fmean(values)
            out[name][stage] = {"inputs": len(values), "min_ms": round(min(values), 4), "max_ms": round(max(values), 4),
                                "max_over_min_minus_1": round(max(values) / min(values) - 1, 6),
                                "cv": round(statistics.pstdev(values) / mean, 6)}
    return out


def _geometry(image_path, width: int, height: int) -> dict[str, Any]:
    from ...media import conditioning_geometry

    return conditioning_geometry(image_path, width, height)


def thumbnail_png(image_path, width: int, height: int) -> bytes:
    """The frame the model receives (:func:`~worldplay.media.load_image`, back to uint8 exactly),
    scaled to :data:`THUMBNAIL_WIDTH` px wide (never up) as a 256-colour PNG."""
    from PIL import Image

    from ...media import load_image

    frame = load_image(image_path, width, height)  # [3, H, W] in [-1, 1], x / 127.5 - 1 of the uint8 crop
    pixels = ((frame.permute(1, 2, 0).numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    if img.width > THUMBNAIL_WIDTH:
        img = img.resize((THUMBNAIL_WIDTH, max(1, round(img.height * THUMBNAIL_WIDTH / img.width))), Image.LANCZOS)
    buf = io.BytesIO()
    img.quantize(256).save(buf, format="PNG", optimize=True)
    return buf.getvalue()
