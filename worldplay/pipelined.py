"""Two-device pipelining: device 0 runs the DiT of chunk n+1 while device 1 decodes chunk n.

One H100 cannot reach 16 frames/s (1 s per 16-frame chunk) with the DiT and the VAE decode in
sequence. The decode needs only the chunk's clean latents (1.35 MB in bf16 at 704x1280), and
the DiT never needs decoded pixels, so the two stages pipeline across two GPUs: the time per
chunk becomes max(DiT, decode) plus a latent transfer, instead of their sum.

Two processes (``torch.multiprocessing``), one per device, joined by ``torch.distributed``
(NCCL on GPUs, gloo on the CPU for tests). Both load the same weights through the
``build_models`` callable. Rank 0 runs :meth:`WorldPlayPipeline.rollout` with ``decode=False``
and sends each chunk's latents to rank 1, which decodes them with its own streaming VAE state in
chunk order. The frames are therefore the one-device rollout's frames, bit for bit, given
deterministic kernels (tested on the CPU).

Timing: each rank stamps ``time.perf_counter()`` (one monotonic clock for processes of one host)
when a chunk's latents are sent (rank 0) and when its frames are on the host (rank 1).
``interval`` is the time between consecutive frames-ready stamps and ``sent_interval`` the time
between consecutive sends. Output cannot outpace input for long, so the steady pipelined time per
chunk is ``max(interval, sent_interval)`` (``pipelined``): a decoder working off a backlog shows
short intervals that the DiT cannot sustain (the first two-GPU bench measured exactly that, with
the decoder's compile still running while the DiT raced ahead). For the same reason rank 1 warms
its decoder up (compiles it) on a scratch stream before the rollout starts, and ``recv_wait``
(GPU time the decode stream waited for the latents) says which side is the bottleneck.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .media import frames_to_uint8
from .memory import CHUNK_LATENTS
from .models import LoadedModels
from .pose import Trajectory
from .rollout import RolloutError, RolloutSettings, StageTimer, WorldPlayPipeline


@dataclass
class PipelinedChunk:
    index: int
    frames: np.ndarray | None  # uint8 [T, H, W, 3] (None unless keep_frames)
    latents: torch.Tensor  # float32 [1, C, 4, h, w], CPU
    timings_ms: dict[str, float]  # rank 0's stages, rank 1's decode, and interval (see module doc)
    sent_s: float  # rank 0: latents handed to the transfer
    ready_s: float  # rank 1: frames on the host
    memory_indices: list[int] | None = None


class PipelineError(RuntimeError):
    """A worker process failed; the message carries its traceback."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pipelined_rollout(
    build_models: Callable[[torch.device], LoadedModels],
    image: torch.Tensor,
    text_states: torch.Tensor,
    trajectory: Trajectory,
    settings: RolloutSettings,
    *,
    devices: tuple[str, str] = ("cuda:0", "cuda:1"),
    keep_frames: bool = True,
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[list[PipelinedChunk], dict]:
    """Run one rollout over two devices; returns the chunks in order and the accel counters of
    rank 0. ``build_models`` must be picklable (a module-level function or a partial of one)."""
    if dtype != torch.bfloat16:
        raise RolloutError("pipelined rollouts run in bfloat16 (the float32 reference decodes latent by latent)")
    trajectory.for_chunks(settings.num_chunk)  # errors before any process starts
    # "cuda" means the first GPU; process groups need explicit indices.
    devices = tuple(f"{d}:0" if d == "cuda" else d for d in devices)
    backend = "nccl" if all(d.startswith("cuda") for d in devices) else "gloo"
    if backend == "nccl" and torch.cuda.device_count() < 2:
        raise RolloutError(f"a two-GPU pipeline needs 2 CUDA devices; this machine has {torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory(prefix="worldplay-pipe-") as tmp:
        out_dir = Path(tmp)
        args = (_free_port(), build_models, image.cpu(), text_states.cpu(), trajectory,
                dataclasses.replace(settings, decode=True), devices, backend, keep_frames, str(out_dir))
        try:
            mp.start_processes(_worker, args=args, nprocs=2, join=True, start_method="spawn")
        except Exception as exc:  # noqa: BLE001 - re-raised with the workers' own tracebacks
            errors = [p.read_text() for p in sorted(out_dir.glob("error-*.txt"))] or [str(exc)]
            last = errors[0].strip().splitlines()[-1]
            raise PipelineError(f"a pipeline worker failed: {last}\n" + "\n".join(errors)) from None
        rank0 = json.loads((out_dir / "rank0.json").read_text())
        rank1 = json.loads((out_dir / "rank1.json").read_text())
        chunks = []
        for c0, c1 in zip(rank0["chunks"], rank1["chunks"], strict=True):
            i = c0["index"]
            frames = np.load(out_dir / f"frames-{i}.npy") if keep_frames else None
            latents = torch.load(out_dir / f"latents-{i}.pt", weights_only=True)
            timings = {**c0["timings_ms"], "decode": c1["decode_ms"], "recv_wait": c1["recv_wait_ms"]}
            chunks.append(PipelinedChunk(index=i, frames=frames, latents=latents, timings_ms=timings,
                                         sent_s=c0["sent_s"], ready_s=c1["ready_s"],
                                         memory_indices=c0["memory_indices"]))
    for prev, cur in zip(chunks, chunks[1:], strict=False):
        cur.timings_ms["interval"] = (cur.ready_s - prev.ready_s) * 1e3
        cur.timings_ms["sent_interval"] = (cur.sent_s - prev.sent_s) * 1e3
        cur.timings_ms["pipelined"] = max(cur.timings_ms["interval"], cur.timings_ms["sent_interval"])
    return chunks, rank0["accel"]


def _worker(rank, port, build_models, image, text_states, trajectory, settings, devices, backend, keep_frames,
            out_dir) -> None:
    out = Path(out_dir)
    try:
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
        device = torch.device(devices[rank])
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, rank=rank, world_size=2,
                                device_id=device if device.type == "cuda" else None)
        try:
            models = build_models(device)
            if rank == 1:
                _warm_up_decoder(models, image, settings, device)
            dist.barrier()  # rank 0 starts the rollout once the decoder is ready
            if rank == 0:
                _dit_side(models, image, text_states, trajectory, settings, device, out)
            else:
                _decode_side(models, image, settings, device, keep_frames, out)
            dist.barrier()
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent through the file
        (out / f"error-{rank}.txt").write_text(f"rank {rank} ({devices[rank]}):\n{traceback.format_exc()}")
        raise


def _dit_side(models, image, text_states, trajectory, settings, device, out: Path) -> None:
    pipe = WorldPlayPipeline(models.dit, models.vae, device=device)
    records, pending = [], []
    for chunk in pipe.rollout(image, text_states, trajectory, dataclasses.replace(settings, decode=False)):
        # isend, never waited on until the end: a blocking send would make the DiT's stream wait
        # until the decoder has posted its receive, so a busy decoder would stall the DiT (the
        # first two-GPU bench showed such stalls). The chunk's latents are a fresh tensor that
        # nothing overwrites; the process group keeps it alive until the transfer is done.
        latents = chunk.device_latents.contiguous()
        pending.append((dist.isend(latents, dst=1), latents))  # the tensor is held until the end
        records.append({"index": chunk.index, "timings_ms": chunk.timings_ms, "sent_s": time.perf_counter(),
                        "memory_indices": list(chunk.memory.indices) if chunk.memory else None})
        torch.save(chunk.latents, out / f"latents-{chunk.index}.pt")
    for work, _ in pending:
        work.wait()
    (out / "rank0.json").write_text(json.dumps({"chunks": records, "accel": pipe.last_accel_stats.to_dict()}))


def _latent_shape(models, image) -> tuple[int, int, int, int, int]:
    spatial = models.vae.config.scale_factor_spatial
    return (1, models.dit.config.in_channels, CHUNK_LATENTS, image.shape[-2] // spatial, image.shape[-1] // spatial)


@torch.no_grad()
def _warm_up_decoder(models, image, settings, device) -> None:
    """Decode two chunks of zeros on a scratch stream: the first (fresh-stream) call and the
    steady call, so that compiling the steady decoder does not happen inside the timed rollout."""
    vae = models.vae
    if settings.fast_decode:
        vae.enable_fast_decode()
    shape = _latent_shape(models, image)
    scratch = vae.new_decode_state(1, shape[3], shape[4], device=device, dtype=next(vae.parameters()).dtype)
    zeros = torch.zeros(shape, dtype=torch.bfloat16, device=device)
    for _ in range(2):
        vae.decode(zeros, scratch)
    del scratch
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _decode_side(models, image, settings, device, keep_frames: bool, out: Path) -> None:
    vae = models.vae
    shape = _latent_shape(models, image)
    state = vae.new_decode_state(1, shape[3], shape[4], device=device, dtype=next(vae.parameters()).dtype)
    records = []
    with torch.no_grad():
        for index in range(settings.num_chunk):
            latents = torch.empty(shape, dtype=torch.bfloat16, device=device)
            timer = StageTimer(device)
            dist.recv(latents, src=0)
            timer.mark("recv_wait")
            frames = frames_to_uint8(vae.decode(latents, state)).cpu()
            timer.mark("decode")
            ready = time.perf_counter()
            stages = timer.read()
            records.append({"index": index, "decode_ms": stages["decode"], "recv_wait_ms": stages["recv_wait"],
                            "ready_s": ready})
            if keep_frames:
                np.save(out / f"frames-{index}.npy", frames.numpy())
    (out / "rank1.json").write_text(json.dumps({"chunks": records}))


def _build_random(preset: str, seed: int, device: torch.device) -> LoadedModels:
    from .models import random_models

    return random_models(preset, seed, device=device)


def random_builder(preset: str, seed: int) -> Callable[[torch.device], LoadedModels]:
    """A picklable ``build_models`` for seeded random weights (benchmarks and tests)."""
    import functools

    return functools.partial(_build_random, preset, seed)
