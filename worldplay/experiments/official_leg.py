"""The official leg of an experiment: :class:`worldplay.official.OfficialLeg`, adapted to
:class:`~worldplay.experiments.legs.LegChunk` records with the common stage names.

This module is the only point of contact between the experiments and ``worldplay.official``;
it is imported only when an experiment lists the ``official`` leg. The official pipeline needs
``torch.distributed`` initialised; without a launcher's environment (``WORLD_SIZE``) the runner
sets up a one-process group itself (the variables ``torch.distributed.run --nproc_per_node=1``
would set), so a plain ``python -m worldplay experiment run NAME --official PATH`` works. Its
pinned dependencies (diffusers 0.35, transformers 4.57, ...) must be importable first on
``PYTHONPATH`` (see ``scripts/official_rollout.py``).

Run the native legs before the official one in a process: importing the official code turns
cuDNN attention off globally (``wan/platforms/cuda.py``), and ``compile=False`` disables dynamo
globally.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..models import LoadedModels
from ..pose import Trajectory
from .legs import LegChunk
from .schema import ExperimentConfig

log = logging.getLogger(__name__)

OFFICIAL_ENV = "WORLDPLAY_OFFICIAL"


class OfficialLegUnavailable(RuntimeError):
    """The official leg was asked for but cannot run here; the message says what to do."""


def official_root(cli_value: str | None) -> Path | None:
    value = cli_value or os.environ.get(OFFICIAL_ENV)
    return Path(value).expanduser() if value else None


def check_can_run(name: str, root: Path | None) -> None:
    """Fail before any model work when the official leg cannot start."""
    if root is None:
        raise OfficialLegUnavailable(
            f"experiment '{name}' lists the official leg but no official checkout was given: pass "
            f"--official PATH (or set {OFFICIAL_ENV}), or --skip-official to report the leg as skipped"
        )
    if not root.is_dir():
        raise OfficialLegUnavailable(f"--official {root}: no such directory")
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise OfficialLegUnavailable(f"the official leg runs in one process; WORLD_SIZE={os.environ['WORLD_SIZE']}")


def single_process_group_env() -> None:
    """The environment of ``torch.distributed.run --nproc_per_node=1``, where no launcher set it."""
    if "WORLD_SIZE" in os.environ:
        return
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})


def weights_dir(models: LoadedModels, cfg: ExperimentConfig, scratch: Path) -> Path:
    """A folder in the published layouts for the official loader: our random weights exported
    (so both legs use identical weights), or links into the real snapshots."""
    from ..official import export_weights

    out = scratch / "official-weights"
    out.mkdir(parents=True, exist_ok=True)
    if cfg.weights.random_init is not None:
        log.info("exporting the random weights for the official leg into %s", out)
        export_weights(models.dit.state_dict(), models.dit.config.to_dict(), models.vae,
                       models.vae.config.to_dict(), out)
        return out
    from ..models import resolve_location
    from .legs import _location

    ckpt = f"hf://{cfg.weights.hub}" if cfg.weights.hub else _location(cfg.weights.path or "")
    ckpt_dir, _ = resolve_location(ckpt, ["wan_transformer/*", "wan_distilled_model/*"])
    base_dir, _ = resolve_location(_location(cfg.weights.base or ""), ["vae/*"])
    for name, target in (("wan_transformer", ckpt_dir / "wan_transformer"),
                         ("wan_distilled_model", ckpt_dir / "wan_distilled_model"), ("vae", base_dir / "vae")):
        link = out / name
        if not link.exists():
            link.symlink_to(target.resolve(), target_is_directory=True)
    return out


class OfficialRunner:
    """One constructed official pipeline (weights loaded once), run any number of times."""

    def __init__(self, root: Path, weights: Path, device: torch.device, compile: bool):
        from ..official import OfficialLeg

        single_process_group_env()
        self.compile = compile
        self.leg = OfficialLeg(root, weights, device=device, compile=compile)

    def environment(self) -> dict[str, Any]:
        with contextlib.suppress(Exception):
            return self.leg.environment()
        return {}

    def close(self) -> None:
        self.leg = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def rollout(self, cfg: ExperimentConfig, image_path: Path, text: torch.Tensor, trajectory: Trajectory, *,
                desc: str = "official", progress: bool = True) -> Iterator[LegChunk]:
        viewmats = torch.from_numpy(np.array(trajectory.viewmats))
        ks = torch.from_numpy(np.array(trajectory.intrinsics))
        actions = torch.from_numpy(np.array(trajectory.actions))
        num_frames = (cfg.noise_latents - 1) * 4 + 1
        stream = self.leg.rollout(image_path, text.to(torch.bfloat16), viewmats, ks, actions, cfg.num_chunk,
                                  seed=cfg.seed, num_frames=num_frames)
        for res in tqdm(stream, total=cfg.num_chunk, desc=desc, unit="chunk", disable=not progress, leave=False):
            raw = dict(res.timings_ms)
            t: dict[str, float] = {"prefill": float(raw.get("prefill") or 0.0), "steps": float(raw["steps"])}
            for i, ms in enumerate(raw.get("step_each") or []):
                t[f"step{i}"] = float(ms)
            t["dit"] = t["prefill"] + t["steps"]
            t["decode"] = float(raw["decode"])
            t["total"] = t["dit"] + t["decode"]
            t["dit_call"] = float(raw["dit"])
            if raw.get("memory_select") is not None:
                t["memory_select"] = float(raw["memory_select"])
            if raw.get("decode_wall") is not None:
                t["decode_wall"] = float(raw["decode_wall"])
            memory = list(res.memory_indices) if res.memory_indices is not None else None
            yield LegChunk(
                index=res.index,
                frames=np.asarray(res.frames),
                latents=res.latents.float(),
                timings_ms=t,
                memory_indices=memory,
                retrieved_clip=_retrieved_clip(memory, res.index),
                extra={"peak_memory_bytes": res.peak_memory_bytes},
            )


def _retrieved_clip(memory: list[int] | None, chunk: int) -> int | None:
    """Start of the retrieved clip: the memory frames older than the 12 recent ones."""
    if not memory or chunk < 4:
        return None
    old = [i for i in memory if i < 4 * chunk - 12]
    return min(old) if old else None


# ---------------------------------------------------------------------------------------------
# The official code at world size N (its sequence parallel and parallel VAE decode)
# ---------------------------------------------------------------------------------------------


def ranked_rollout(root: Path, weights: Path, cfg: ExperimentConfig, image_path: Path, text: torch.Tensor,
                   trajectory: Trajectory, *, ranks: int, compile: bool, peaks_out: dict | None = None,
                   devices: tuple[str, ...] | None = None, runner_factory=None) -> Iterator[LegChunk]:
    """The official pipeline over ``ranks`` processes, as ``torchrun --nproc_per_node N`` would
    start it (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` set for
    each; the official code initialises the process group itself and switches to its sequence-
    parallel DiT and parallel VAE on ``WORLD_SIZE``). Every rank ends a chunk with the whole
    latents and frames; rank 0's chunks are yielded, timed on rank 0. ``peaks_out`` receives each
    rank's peak memory over the rollout (the official leg resets the CUDA peaks per chunk: the
    maximum over its chunks). ``runner_factory(root, weights, device, compile)`` stands in for
    :class:`OfficialRunner` in tests."""
    import torch.multiprocessing as mp

    from ..ranks.spawn import _free_port, default_devices, end_workers, receive_record, wait_for_exit

    devices = default_devices(ranks) if devices is None else tuple(devices)
    records = mp.get_context("spawn").Queue()
    args = (ranks, _free_port(), root, weights, cfg, image_path, text.cpu(), trajectory, compile, devices,
            runner_factory, records)
    workers = mp.start_processes(_ranked_worker, args=args, nprocs=ranks, join=False, start_method="spawn")
    ends: dict[int, dict] = {}
    try:
        received = 0
        while received < cfg.num_chunk or len(ends) < ranks:
            kind, rank, payload = receive_record(
                workers, records, lambda rank, line: f"official leg at world size {ranks}, rank {rank}: {line}",
                name="the official ranks", context=f"official leg at world size {ranks}: ")
            if kind == "end":
                ends[rank] = payload
            else:
                received += 1
                yield payload
        wait_for_exit(workers)
    finally:
        end_workers(workers)
    if peaks_out is not None:
        peaks_out.update({f"rank{r} ({devices[r]})": ends[r] for r in sorted(ends)})


def _ranked_worker(rank, size, port, root, weights, cfg, image_path, text, trajectory, compile, devices,
                   runner_factory, records) -> None:
    from ..allocator import read_peaks

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    device = torch.device(devices[rank])
    try:
        runner = (runner_factory or OfficialRunner)(root, weights, device, compile)
        peak: dict[str, float] = {}
        for chunk in runner.rollout(cfg, image_path, text, trajectory, progress=False):
            for key, value in read_peaks(device).items():  # this chunk's peak (the leg resets them per chunk)
                peak[key] = max(peak.get(key, value), value)
            if rank == 0:
                records.put(("chunk", 0, LegChunk(chunk.index, frames=chunk.frames[:0], latents=chunk.latents,
                                                   timings_ms=chunk.timings_ms, memory_indices=chunk.memory_indices,
                                                   retrieved_clip=chunk.retrieved_clip, extra=chunk.extra)))
        records.put(("end", rank, peak))
        runner.close()
    except BaseException as exc:
        records.put(("error", rank, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
        raise
