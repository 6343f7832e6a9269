"""``drift``: two legs over the same inputs, compared chunk by chunk (per-frame and per-chunk
mean |delta| of the uint8 frames, per-chunk latent relative error). The first leg is the one
under test, the second the reference (e.g. ``native-eager`` against ``native-float32``).

The float32 leg uses the same weights cast to float32 (exact for bf16 weights), float32 compute
and float32 RoPE tables. Native legs run first, the official leg (if any) last.
"""

from __future__ import annotations

from typing import Any

from ..compare import compare_runs
from ..context import KindOutput, RunContext
from ..legs import LegChunk, load_models
from ..schema import OFFICIAL_LEG, DriftConfig
from . import paired


def run(ctx: RunContext) -> KindOutput:
    cfg: DriftConfig = ctx.config  # type: ignore[assignment]
    inputs = paired.prepare(ctx)
    provenance = dict(inputs.provenance)
    models = load_models(cfg.weights, cfg.preset, ctx.device, provenance)
    outputs: dict[str, list[LegChunk]] = {}
    legs: dict[str, dict[str, Any]] = {}
    for name in sorted(cfg.legs, key=lambda n: n == OFFICIAL_LEG):  # native legs first
        if name == OFFICIAL_LEG:
            weights = paired.official_weights(ctx, models)
            models = None
            paired.free(ctx.device)
            runner = paired.make_official_runner(ctx, weights, cfg.official_compile, provenance)
            outputs[name], legs[name] = paired.run_official(ctx, runner, inputs, desc=name)
            runner.close()
        else:
            outputs[name], legs[name] = paired.run_native(ctx, name, models, inputs)
    models = None
    paired.free(ctx.device)
    test, ref = cfg.legs
    label = f"{test} vs {ref}"
    chunk_rows, frame_rows, comparison = compare_runs(outputs[test], outputs[ref], label)
    summary = {
        "test_leg": test,
        "reference_leg": ref,
        "comparison": {label: comparison},
        "legs": legs,
        "retrieved_clips": {name: {str(c.index): c.retrieved_clip for c in chunks if c.index >= 4}
                            for name, chunks in outputs.items()},
        # the latents each chunk attended to, as each leg selected them (the site plots these)
        "memory_indices": {name: {str(c.index): c.memory_indices for c in chunks if c.memory_indices is not None}
                           for name, chunks in outputs.items()},
    }
    return KindOutput(summary=summary, chunk_rows=chunk_rows, frame_rows=frame_rows, provenance=provenance)
