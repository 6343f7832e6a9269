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
import logging
import os
import re
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..models import LoadedModels
from ..pose import Trajectory, load_trajectory
from .inputs import InputManifest, sha256_of
from .schema import INPUT_PREFIX, SYNTHETIC_IMAGE, ExperimentConfig, WeightsSpec

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "First-person view walking around ancient Athens, with Greek architecture and marble structures"
_HUB_SPEC = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+@[0-9a-f]{40}$")


def fastest_settings(device_type: str) -> dict[str, Any]:
    """The fastest known native ``RolloutSettings`` overrides: the one place the
    ``native-fastest`` leg is defined (the performance work updates it here).

    On CUDA: FlashAttention-4 (the optional ``flash-attn-4`` package, 8-12 % faster than cuDNN on
    the H100 for these shapes) where it imports, else cuDNN attention; compiled blocks, the
    steady-state prefill and steps as CUDA-graph replays, the fused q/k/v and GELU kernels
    (``worldplay.nn.fused``), and the channels-last compiled VAE decoder (notes/perf.md has the
    measurements). The result records the backend used.
    On the CPU cuDNN attention and CUDA graphs do not exist; the dispatcher's choice (``sdpa``)
    stands in, eagerly, and the result says so.
    """
    if device_type == "cuda":
        from ..nn.attention import fa4_usable

        backend = "fa4" if fa4_usable() else "cudnn"
        return {"attention_backend": backend, "accel": "compile+graphs", "fast_decode": True, "fused_kernels": True}
    return {"attention_backend": "sdpa"}


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
        return {"dtype": str(self.dtype).removeprefix("torch."), **dataclasses.asdict(settings)}


def native_leg(name: str, device_type: str) -> NativeLeg:
    if name == "native-eager":
        return NativeLeg(name, torch.bfloat16, {})
    if name == "native-fastest":
        return NativeLeg(name, torch.bfloat16, fastest_settings(device_type))
    if name == "native-float32":
        return NativeLeg(name, torch.float32, {"official_rope_tables": False})
    if name == "native-reuse":
        return NativeLeg(name, torch.bfloat16, {**fastest_settings(device_type), "memory_mode": "reuse"})
    if name == "native-compiled":
        return NativeLeg(name, torch.bfloat16, {"accel": "compile"})
    # Fast modes on top of the fastest settings, one or two GPUs (worldplay.pipelined).
    fast_modes = {
        "native-fp8": {"linear_dtype": "fp8"},
        "native-reuse-fp8": {"memory_mode": "reuse", "linear_dtype": "fp8"},
        "native-2gpu": {},
        "native-2gpu-reuse": {"memory_mode": "reuse"},
        "native-2gpu-reuse-fp8": {"memory_mode": "reuse", "linear_dtype": "fp8"},
    }
    if name in fast_modes:
        return NativeLeg(name, torch.bfloat16, {**fastest_settings(device_type), **fast_modes[name]})
    raise ValueError(f"{name!r} is not a native leg")


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


def synthetic_image(path: Path, height: int, width: int, seed: int) -> Path:
    """A deterministic smooth colour image (seeded random Fourier pattern) saved as PNG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    img = np.zeros((height, width, 3))
    for c in range(3):
        for _ in range(4):
            fy, fx = rng.uniform(0.5, 4.0, size=2)
            phase = rng.uniform(0, 2 * np.pi)
            img[..., c] += np.sin(2 * np.pi * (fy * yy + fx * xx) + phase)
    img = (img - img.min()) / (img.max() - img.min() + 1e-12)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((img * 255).round().astype(np.uint8)).save(path, format="PNG")
    return path


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


def native_rollout(models: LoadedModels, leg: NativeLeg, cfg: ExperimentConfig, image_path: Path,
                   text: torch.Tensor, trajectory: Trajectory, device: torch.device, *,
                   desc: str = "", progress: bool = True, accel_out: dict | None = None) -> Iterator[LegChunk]:
    """Run one native rollout and yield its chunks with normalised stage names.

    ``accel_out`` receives the rollout's CUDA-graph and compile counters (captures, replays,
    recompiles in the steady state) once the rollout is complete."""
    from ..media import load_image
    from ..rollout import WorldPlayPipeline

    cast_models(models, leg.dtype)
    height, width = cfg.resolution
    image = load_image(image_path, width, height)
    pipe = WorldPlayPipeline(models.dit, models.vae, device=device, dtype=leg.dtype)
    stream = pipe.rollout(image, text, trajectory, leg.settings(cfg))
    for out in tqdm(stream, total=cfg.num_chunk, desc=desc or leg.name, unit="chunk", disable=not progress,
                    leave=False):
        t = _leg_timings(out.timings_ms)
        t["total"] = t["dit"] + t["decode"]
        yield LegChunk(
            index=out.index,
            frames=out.frames.numpy(),
            latents=out.latents,
            timings_ms=t,
            memory_indices=list(out.memory.indices) if out.memory else None,
            retrieved_clip=out.memory.chosen_start if out.memory else None,
        )
    if accel_out is not None:
        accel_out.update(pipe.last_accel_stats.to_dict())


def _build_for_pipeline(weights: WeightsSpec, preset: str, device: torch.device) -> LoadedModels:
    return load_models(weights, preset, device)


def pipelined_native_rollout(weights: WeightsSpec, leg: NativeLeg, cfg: ExperimentConfig, image_path: Path,
                             text: torch.Tensor, trajectory: Trajectory, *, accel_out: dict | None = None
                             ) -> Iterator[LegChunk]:
    """A native leg over two GPUs (worldplay.pipelined): each process loads ``weights`` itself.
    Stage names as :func:`native_rollout`, plus ``interval``, ``sent_interval``, ``recv_wait``
    and ``pipelined`` (see worldplay.pipelined); ``total`` is ``pipelined``, the sustained time
    per chunk (max of the output and input intervals)."""
    import functools

    from ..media import load_image
    from ..pipelined import pipelined_rollout

    height, width = cfg.resolution
    image = load_image(image_path, width, height)
    build = functools.partial(_build_for_pipeline, weights, cfg.preset)
    chunks, accel = pipelined_rollout(build, image, text, trajectory, leg.settings(cfg), keep_frames=False)
    for out in chunks:
        t = _leg_timings(out.timings_ms)
        t["total"] = t.get("pipelined", t["dit"] + t["decode"])
        yield LegChunk(index=out.index, frames=np.zeros((0, height, width, 3), np.uint8), latents=out.latents,
                       timings_ms=t, memory_indices=out.memory_indices)
    if accel_out is not None:
        accel_out.update(accel)


# ---------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, Any]]:
    """Fill a dict with the peak memory of the enclosed work (CUDA: allocator peaks since the
    start of the block; CPU: the process's peak RSS so far, which only ever grows)."""
    out: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    yield out
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 3)
        out["scope"] = "torch CUDA allocator, this leg's rollouts (weights included)"
    else:
        out["host_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        out["scope"] = "host peak RSS of the whole process so far (CPU run)"
