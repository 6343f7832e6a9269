"""Shared plumbing of the kinds that compare two rollouts of the same inputs (drift, parity)."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...constants import CHUNK_LATENTS, MEMORY_SLOTS
from ..context import RunContext
from ..legs import (
    LegChunk,
    native_leg,
    native_rollout,
    peak_memory,
    prepare_image,
    prompt_for,
    ranked_native_rollout,
    text_states,
    trajectory_for,
)
from ..schema import ranks_of
from ..stats import summarize

STEADY_FROM = MEMORY_SLOTS // CHUNK_LATENTS  # chunk 4: the first with a full memory


@dataclass
class PairedInputs:
    image_path: Path
    text: torch.Tensor
    trajectory: Any
    provenance: dict[str, Any]


def prepare(ctx: RunContext) -> PairedInputs:
    cfg = ctx.config
    image_path, image_identity = prepare_image(cfg.image, cfg, ctx.manifest, ctx.scratch)
    prompt, prompt_source = prompt_for(cfg.image, ctx.manifest)
    trajectory = trajectory_for(cfg.pose, cfg.num_chunk, ctx.manifest)
    text, text_identity = text_states(cfg, prompt, ctx.device)
    provenance = {"image": image_identity, "text": {**text_identity, "prompt_source": prompt_source},
                  "trajectory": trajectory.source}
    return PairedInputs(image_path, text, trajectory, provenance)


def run_native(ctx: RunContext, name: str, models, inputs: PairedInputs) -> tuple[list[LegChunk], dict[str, Any]]:
    leg = native_leg(name, ctx.device.type)
    t0 = time.perf_counter()
    if ranks_of(name) > 1:  # N ranks in processes of their own, each loading the weights
        memory: dict = {}
        chunks = list(ranked_native_rollout(ctx.config.weights, leg, ctx.config, inputs.image_path, inputs.text,
                                            inputs.trajectory, keep_frames=True, memory_out=memory))
        return chunks, {"kind": "native", "ranks": ranks_of(name), "settings": leg.describe(ctx.config),
                        "peak_memory": memory, "rollout_wall_s": round(time.perf_counter() - t0, 3),
                        "timings": timing_summary(chunks)}
    with peak_memory(ctx.device) as peak:
        chunks = list(native_rollout(models, leg, ctx.config, inputs.image_path, inputs.text, inputs.trajectory,
                                     ctx.device, desc=name, progress=ctx.progress))
    return chunks, {"kind": "native", "settings": leg.describe(ctx.config), "peak_memory": peak,
                    "rollout_wall_s": round(time.perf_counter() - t0, 3), "timings": timing_summary(chunks)}


def timing_summary(chunks: list[LegChunk]) -> dict[str, Any]:
    """Steady-state (chunks >= 4) medians of the main stages; informational in drift/parity."""
    steady = [c for c in chunks if c.index >= STEADY_FROM] or chunks[-1:]
    return {s: summarize(c.timings_ms[s] for c in steady if s in c.timings_ms)
            for s in ("prefill", "steps", "dit", "decode", "total")}


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def official_weights(ctx: RunContext, models) -> Path:
    """The weights folder of the official leg (our random weights exported, or the real snapshots)."""
    from .. import official_leg

    return official_leg.weights_dir(models, ctx.config, ctx.scratch)


def make_official_runner(ctx: RunContext, weights: Path, compile: bool, provenance: dict[str, Any]):
    from .. import official_leg
    from ..provenance import official_checkout

    runner = official_leg.OfficialRunner(ctx.official_root, weights, ctx.device, compile)
    provenance.setdefault("official", {**(official_checkout(ctx.official_root) or {}),
                                       "environment": runner.environment()})
    return runner


def run_official(ctx: RunContext, runner, inputs: PairedInputs, desc: str) -> tuple[list[LegChunk], dict[str, Any]]:
    t0 = time.perf_counter()
    with peak_memory(ctx.device) as peak:
        chunks = list(runner.rollout(ctx.config, inputs.image_path, inputs.text, inputs.trajectory, desc=desc,
                                     progress=ctx.progress))
    return chunks, {"kind": "official", "settings": {"compile": runner.compile}, "peak_memory": peak,
                    "rollout_wall_s": round(time.perf_counter() - t0, 3), "timings": timing_summary(chunks)}
