"""``parity``: a native leg against the official code with identical weights, next to the
official code's own noise floor (official vs official: run twice, or with its compile toggled,
which changes kernels). Per chunk: mean |delta| of the uint8 frames and latent relative error.

Needs the official checkout (``--official``) and a GPU; there is no CPU version.
"""

from __future__ import annotations

from typing import Any

from ..compare import compare_runs
from ..context import KindOutput, RunContext
from ..legs import load_models
from ..schema import OFFICIAL_LEG, ParityConfig
from . import paired


def run(ctx: RunContext) -> KindOutput:
    cfg: ParityConfig = ctx.config  # type: ignore[assignment]
    native_name = cfg.legs[0]
    inputs = paired.prepare(ctx)
    provenance = dict(inputs.provenance)
    models = load_models(cfg.weights, cfg.preset, ctx.device, provenance)
    legs: dict[str, dict[str, Any]] = {}
    native_chunks, legs[native_name] = paired.run_native(ctx, native_name, models, inputs)
    weights = paired.official_weights(ctx, models)
    models = None
    paired.free(ctx.device)

    runner = paired.make_official_runner(ctx, weights, cfg.official_compile, provenance)
    official_chunks, legs[OFFICIAL_LEG] = paired.run_official(ctx, runner, inputs, desc=OFFICIAL_LEG)
    floor_chunks = None
    if cfg.floor == "repeat":
        floor_chunks, legs["official-floor"] = paired.run_official(ctx, runner, inputs, desc="official (again)")
    runner.close()
    paired.free(ctx.device)
    if cfg.floor == "compile-toggle":
        runner = paired.make_official_runner(ctx, weights, not cfg.official_compile, provenance)
        floor_chunks, legs["official-floor"] = paired.run_official(ctx, runner, inputs, desc="official (toggled)")
        runner.close()

    label = f"{native_name} vs official"
    chunk_rows, frame_rows, main = compare_runs(native_chunks, official_chunks, label)
    comparisons = {label: main}
    if floor_chunks is not None:
        floor_label = f"official floor ({cfg.floor})"
        rows, frames, floor = compare_runs(floor_chunks, official_chunks, floor_label)
        chunk_rows += rows
        frame_rows += frames
        comparisons[floor_label] = floor
    summary = {
        "native_leg": native_name,
        "floor": cfg.floor,
        "comparison": comparisons,
        "legs": legs,
        "regime": "same weights, same seed and noise tensor, same image file and prompt embeddings; frames compared "
                  "as uint8 before video encoding",
    }
    return KindOutput(summary=summary, chunk_rows=chunk_rows, frame_rows=frame_rows, provenance=provenance)
