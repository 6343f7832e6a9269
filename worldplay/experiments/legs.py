"""The legs of an experiment and their shared inputs: models, image, prompt, trajectory.

A *leg* is one way of producing a rollout. Every leg yields :class:`LegChunk` records with the
same stage names, so that benches, drift and parity compare like with like:

* ``prefill`` (memory K/V prefill forward), ``step0`` .. ``step3`` and ``steps`` (the four
  denoising forwards), ``dit`` = prefill + steps, ``decode`` (VAE decode of the chunk's 4
  latents), ``total`` = dit + decode;
* native only: ``select`` (memory-frame selection); official only: ``memory_select`` (host
  time of its selection), ``dit_call`` (its whole pipeline call: selection, host work, prefill
  and steps), ``decode_wall`` (host wall time of its decode, including the copy to the host).

The native legs run :meth:`worldplay.rollout.WorldPlayPipeline.rollout`; the official leg lives
in :mod:`worldplay.experiments.official_leg` (imported only when an experiment lists it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..constants import DEFAULT_PROMPT
from ..media import synthetic_image
from ..models import LoadedModels
from ..pose import Trajectory, load_trajectory
from .inputs import InputManifest, sha256_of
from .leg_table import LEG_TABLE, leg_row
from .schema import INPUT_PREFIX, SYNTHETIC_IMAGE, ExperimentConfig, WeightsSpec, ranks_of

log = logging.getLogger(__name__)

_HUB_SPEC = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+@[0-9a-f]{40}$")


@dataclass
class LegChunk:
    """One chunk of one leg, in a leg-independent form."""

    index: int
    frames: np.ndarray  # uint8 [T, H, W, 3]
    latents: torch.Tensor  # float32 [1, C, 4, h, w] on the CPU
    timings_ms: dict[str, float]
    memory_indices: list[int] | None = None
    retrieved_clip: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NativeLeg:
    name: str
    dtype: torch.dtype
    overrides: dict[str, Any]
    # GiB the CUDA allocator may use during the leg (a low-VRAM mode proving its card size)
    memory_cap_gib: float | None = None

    def settings(self, cfg: ExperimentConfig):
        from ..rollout import RolloutSettings

        known = {f.name for f in dataclasses.fields(RolloutSettings)}
        missing = sorted(set(self.overrides) - known)
        if missing:
            raise RuntimeError(f"leg {self.name}: RolloutSettings has no {missing} in this version of worldplay")
        base = dict(num_chunk=cfg.num_chunk, seed=cfg.seed, noise_latents=cfg.noise_latents,
                    attention_backend=cfg.attention_backend)
        return RolloutSettings(**{**base, **self.overrides})

    def describe(self, cfg: ExperimentConfig) -> dict[str, Any]:
        settings = self.settings(cfg)
        return {"dtype": str(self.dtype).removeprefix("torch."), **dataclasses.asdict(settings),
                "memory_cap_gib": self.memory_cap_gib}


def native_leg(name: str, device_type: str) -> NativeLeg:
    """The native leg ``name`` of the leg table, its settings resolved for ``device_type``."""
    row = LEG_TABLE.get(name)
    if row is None or not row.native:
        raise ValueError(f"{name!r} is not a native leg")
    return NativeLeg(name, getattr(torch, row.dtype), row.overrides(device_type), memory_cap_gib=row.memory_cap_gib)


# ---------------------------------------------------------------------------------------------
# Shared inputs
# ---------------------------------------------------------------------------------------------


def _location(spec: str) -> str:
    return f"hf://{spec}" if _HUB_SPEC.match(spec) else os.path.expandvars(os.path.expanduser(spec))


def load_models(weights: WeightsSpec, preset: str, device: torch.device,
                provenance: dict[str, Any] | None = None) -> LoadedModels:
    """bf16 models on ``device``: seeded random init, a local snapshot or a pinned hub snapshot.
    With ``provenance``, the weights' identity and the load time are recorded in it."""
    from ..models import load_real_models, random_models

    t0 = time.perf_counter()
    if weights.random_init is not None:
        models = random_models(preset, weights.random_init, device=device, dtype=torch.bfloat16)
    else:
        checkpoint = f"hf://{weights.hub}" if weights.hub else _location(weights.path or "")
        models = load_real_models(checkpoint, _location(weights.base or ""), device=device, dtype=torch.bfloat16)
    if provenance is not None:
        provenance["weights"] = models.identity
        provenance["model_load_s"] = round(time.perf_counter() - t0, 3)
    return models


def cast_models(models: LoadedModels, dtype: torch.dtype) -> None:
    """Cast the models in place (bf16 -> float32 -> bf16 is exact for bf16 weights)."""
    if next(models.dit.parameters()).dtype != dtype:
        models.dit.to(dtype)
        models.vae.to(dtype)


def text_states(cfg: ExperimentConfig, prompt: str, device: torch.device) -> tuple[torch.Tensor, dict[str, Any]]:
    """Prompt embeddings ``[1, L, text_dim]`` and how they were made.

    Random weights get seeded random embeddings (a caption means nothing to them); real
    weights get the umT5 embedding of ``prompt`` (cached on disk)."""
    from ..models import random_text_states

    if cfg.weights.random_init is not None:
        seed = cfg.weights.random_init
        return random_text_states(cfg.preset, seed), {
            "source": f"random-embeddings:{seed}",
            "note": "random weights: random prompt embeddings stand in for the prompt, which is recorded only",
            "prompt": prompt,
        }
    from ..models import resolve_location
    from ..nn.text import prompt_embeddings

    base_dir, _ = resolve_location(_location(cfg.weights.base or ""), ["text_encoder/*", "tokenizer/*"])
    cache = Path(os.environ.get("WORLDPLAY_CACHE_DIR") or Path.home() / ".cache" / "worldplay") / "prompts"
    states, seq_len = prompt_embeddings(prompt, cache_dir=cache, encoder_dir=base_dir, device=device,
                                        dtype=torch.bfloat16)
    return states, {"source": "umT5 (worldplay.nn.text, cached)", "prompt": prompt, "tokens": seq_len}


def prepare_image(image: str, cfg: ExperimentConfig, manifest: InputManifest, scratch: Path) -> tuple[Path, dict]:
    """The image file of an experiment and its identity (input id + sha256, or synthetic seed)."""
    if image == SYNTHETIC_IMAGE:
        height, width = cfg.resolution
        path = synthetic_image(scratch / f"synthetic-{cfg.seed}-{height}x{width}.png", height, width, cfg.seed)
        return path, {"kind": "synthetic", "seed": cfg.seed, "size": [height, width], "sha256": sha256_of(path)}
    path = manifest.resolve(image)
    entry = manifest.entry(image)
    return path, {"kind": "input", "id": image, "url": entry.url, "sha256": entry.sha256}


def prompt_for(image: str, manifest: InputManifest) -> tuple[str, str]:
    """(prompt, where it came from): the official caption of a sample image, else the default."""
    if image != SYNTHETIC_IMAGE:
        with contextlib.suppress(Exception):
            return manifest.caption(image), "official caption (test_case.csv)"
    return DEFAULT_PROMPT, "official default prompt"


def trajectory_for(pose: str, num_chunk: int, manifest: InputManifest) -> Trajectory:
    """A pose string or ``input:<id>`` trajectory, cut to ``num_chunk`` chunks (PoseError if short)."""
    if pose.startswith(INPUT_PREFIX):
        return load_trajectory(manifest.resolve(pose[len(INPUT_PREFIX):])).for_chunks(num_chunk)
    return load_trajectory(pose).for_chunks(num_chunk)


# ---------------------------------------------------------------------------------------------
# Running a native leg
# ---------------------------------------------------------------------------------------------


def _leg_timings(stages: dict[str, float]) -> dict[str, float]:
    """A native chunk's stage times plus ``steps`` (the four denoising forwards) and ``dit``
    (prefill + kv_move + steps; kv_move exists in reuse mode only)."""
    t = dict(stages)
    t["steps"] = sum(v for k, v in t.items() if k.startswith("step"))
    t.setdefault("prefill", 0.0)
    t["dit"] = t["prefill"] + t.get("kv_move", 0.0) + t["steps"]
    return t


def _leg_chunk(out) -> LegChunk:
    """A rollout's :class:`~worldplay.rollout.ChunkOutput` as the legs' record: frames on the
    host, the stage times with ``steps``/``dit`` and ``total`` (the pipelined wall time per chunk
    where DiT and decode overlap, else their sum), the memory the chunk attended to."""
    t = _leg_timings(out.timings_ms)
    t["total"] = t.get("pipelined", t["dit"] + t["decode"])
    return LegChunk(index=out.index, frames=out.frames.numpy(), latents=out.latents, timings_ms=t,
                    memory_indices=list(out.memory.indices) if out.memory else None,
                    retrieved_clip=out.memory.chosen_start if out.memory else None)


def native_rollout(models: LoadedModels, leg: NativeLeg, cfg: ExperimentConfig, image_path: Path,
                   text: torch.Tensor, trajectory: Trajectory, device: torch.device, *,
                   desc: str = "", progress: bool = True, accel_out: dict | None = None) -> Iterator[LegChunk]:
    """Run one native rollout and yield its chunks with normalised stage names.

    ``accel_out`` receives the rollout's CUDA-graph and compile counters (captures, replays,
    recompiles in the steady state) once the rollout is complete."""
    from ..allocator import reset_peaks
    from ..media import load_image
    from ..offload import place_models
    from ..rollout import WorldPlayPipeline

    settings = leg.settings(cfg)
    cast_models(models, leg.dtype)
    place_models(models, settings, device)  # dit_on_host legs: the DiT's weights go to host memory
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reset_peaks(device)  # the leg's peak counts from here, with its models where it runs them
    height, width = cfg.resolution
    image = load_image(image_path, width, height)
    pipe = WorldPlayPipeline(models.dit, models.vae, device=device, dtype=leg.dtype)
    with memory_cap(device, leg.memory_cap_gib):
        stream = pipe.rollout(image, text, trajectory, settings)
        for out in tqdm(stream, total=cfg.num_chunk, desc=desc or leg.name, unit="chunk", disable=not progress,
                        leave=False):
            yield _leg_chunk(out)
    if accel_out is not None:
        accel_out.update(pipe.last_accel_stats.to_dict())


def _build_for_pipeline(weights: WeightsSpec, preset: str, device: torch.device) -> LoadedModels:
    return load_models(weights, preset, device)


def pipelined_native_rollout(weights: WeightsSpec, leg: NativeLeg, cfg: ExperimentConfig, image_path: Path,
                             text: torch.Tensor, trajectory: Trajectory, *, accel_out: dict | None = None,
                             memory_out: dict | None = None) -> Iterator[LegChunk]:
    """A native leg over two GPUs (worldplay.pipelined): each process loads ``weights`` itself.
    Stage names as :func:`native_rollout`, plus ``interval``, ``sent_interval``, ``recv_wait``
    and ``pipelined`` (see worldplay.pipelined); ``total`` is ``pipelined``, the sustained time
    per chunk (max of the output and input intervals). ``memory_out`` receives each rank's peak
    memory (``{"rank0 (DiT)": {...}, "rank1 (decode)": {...}}``)."""
    import functools

    from ..media import load_image
    from ..pipelined import TwoDevicePipeline

    height, width = cfg.resolution
    image = load_image(image_path, width, height)
    pipe = TwoDevicePipeline(functools.partial(_build_for_pipeline, weights, cfg.preset))
    for out in pipe.rollout(image, text, trajectory, leg.settings(cfg), keep_frames=False):
        yield _leg_chunk(out)
    if accel_out is not None:
        accel_out.update(pipe.last_accel_stats.to_dict())
    if memory_out is not None:
        memory_out.update(pipe.last_peaks)


def ranked_native_rollout(weights: WeightsSpec, leg: NativeLeg, cfg: ExperimentConfig, image_path: Path,
                          text: torch.Tensor, trajectory: Trajectory, *, keep_frames: bool = False,
                          accel_out: dict | None = None, memory_out: dict | None = None,
                          traffic_out: dict | None = None) -> Iterator[LegChunk]:
    """A native leg over ``ranks_of(leg.name)`` ranks (worldplay.ranks.spawn): one process per
    rank (a GPU each, or the CPU for a tiny twin), each loading ``weights`` itself. Stage names as
    :func:`native_rollout`, timed on rank 0. ``memory_out``/``traffic_out`` receive each rank's
    peak memory and bytes sent."""
    import functools

    from ..media import load_image
    from ..ranks.spawn import MultiRankPipeline

    ranks = ranks_of(leg.name)
    height, width = cfg.resolution
    image = load_image(image_path, width, height)
    transport = leg_row(leg.name).transport
    devices = ("cpu",) * ranks if cfg.device == "cpu" else None  # on CUDA: a GPU each, or cuda:0 for "host"
    pipe = MultiRankPipeline(functools.partial(_build_for_pipeline, weights, cfg.preset), ranks=ranks,
                             devices=devices, dtype=leg.dtype, transport=transport)
    for out in pipe.rollout(image, text, trajectory, leg.settings(cfg), keep_frames=keep_frames):
        yield _leg_chunk(out)
    if accel_out is not None:
        accel_out.update(pipe.last_accel_stats.to_dict())
    if memory_out is not None:
        memory_out.update(pipe.last_peaks)
    if traffic_out is not None:
        traffic_out.update(pipe.last_traffic)


# ---------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, Any]]:
    """Fill a dict with the peak memory of the enclosed work (CUDA: allocator peaks since the
    start of the block, or since a native leg placed its models; CPU: the process's peak RSS so
    far, which only ever grows)."""
    from ..allocator import read_peaks, reset_peaks

    out: dict[str, Any] = {}
    reset_peaks(device)
    try:
        yield out
    finally:  # an out-of-memory leg records the peak it reached too
        out.update(read_peaks(device))
    out["scope"] = ("torch CUDA allocator, this leg's rollouts (weights included)" if device.type == "cuda"
                    else "host peak RSS of the whole process so far (CPU run)")


def predicted_memory(leg: NativeLeg, cfg: ExperimentConfig) -> dict[str, Any]:
    """The leg's memory plan (worldplay.memory_plan) at the config's size, and its cap, to
    record next to the measured peaks (per GPU for a leg over several ranks)."""
    from ..memory_plan import plan_memory

    height, width = cfg.resolution
    plan = plan_memory(cfg.preset, height, width, leg.settings(cfg), dtype=leg.dtype,
                       device_type="cuda" if cfg.device == "cuda" else "cpu", ranks=ranks_of(leg.name))
    return {"cap_gib": leg.memory_cap_gib, "predicted_peak_allocated_gib": round(plan.peak_bytes / 2**30, 3),
            "predicted_reserved_upper_gib": round(plan.reserved_upper_bytes / 2**30, 3),
            "predicted_stage_gib": plan.to_dict()["stage_gib"]}


@contextlib.contextmanager
def memory_cap(device: torch.device, cap_gib: float | None) -> Iterator[None]:
    """Cap this process's CUDA allocator at ``cap_gib`` inside the block
    (``torch.cuda.set_per_process_memory_fraction``: a low-VRAM leg proves the card size it is
    for on a larger card); nothing elsewhere or without a cap."""
    if cap_gib is None or device.type != "cuda":
        yield
        return
    # set_per_process_memory_fraction wants an index: a plain "cuda" names the current device.
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total), index)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)
