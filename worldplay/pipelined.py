"""Two-device pipelining: device 0 runs the DiT of chunk n+1 while device 1 decodes chunk n.

One H100 cannot reach 16 frames/s (1 s per 16-frame chunk) with the DiT and the VAE decode in
sequence. The decode needs only the chunk's clean latents (1.35 MB in bf16 at 704x1280), and
the DiT never needs decoded pixels, so the two stages pipeline across two GPUs: the time per
chunk becomes max(DiT, decode) plus a latent transfer, instead of their sum.

Two processes (``torch.multiprocessing``), one per device, joined by ``torch.distributed``
(NCCL on GPUs, gloo on the CPU for tests). Both load the same weights through the
``build_models`` callable. Rank 0 runs :meth:`worldplay.rollout.WorldPlayPipeline.rollout` with ``decode=False``
and sends each chunk's latents to rank 1, which decodes them with its own streaming VAE state in
chunk order. The frames are therefore the one-device rollout's frames, bit for bit, given
deterministic kernels (tested on the CPU). Both ranks stream their halves of each chunk back to
the calling process through a queue, which yields them as the same
:class:`~worldplay.rollout.ChunkOutput` records as the one-device rollout, as they arrive.

Against N ranks of one session (:mod:`worldplay.ranks`: the DiT in sequence parallel, the decode
split by columns) this pipeline loses from two GPUs on: a chunk still waits for one GPU's whole
DiT (predicted 0.97 s per chunk at 704x1280 against 0.76 s for two ranks, notes/perf.md round 7).
Splitting N GPUs into a DiT group and a decode group pays only where the DiT's sequence parallel
loses efficiency (predicted ~9 % at 8 GPUs: 6 for the DiT, 2 for the decode), so it is not built.

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
import os
import queue
import socket
import time
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .accel import AccelStats
from .allocator import read_peaks, reset_peaks
from .decode_runner import DecodeOptions, DecodeRunner
from .media import frames_to_uint8
from .memory import CHUNK_LATENTS
from .models import LoadedModels
from .pose import Trajectory
from .rollout import ChunkOutput, RolloutError, RolloutSettings, WorldPlayPipeline
from .timing import StageTimer


class PipelineError(RuntimeError):
    """A worker process failed; the message carries its traceback."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TwoDevicePipeline:
    """:class:`~worldplay.rollout.WorldPlayPipeline` over two devices: the DiT on ``devices[0]``,
    the VAE decode on ``devices[1]``, each in its own process with the models ``build_models``
    gives it (it must be picklable: a module-level function or a partial of one).
    :meth:`rollout` yields the same records as the one-device rollout; ``last_accel_stats``
    holds rank 0's counters once the stream has ended."""

    def __init__(self, build_models: Callable[[torch.device], LoadedModels], *,
                 devices: tuple[str, str] = ("cuda:0", "cuda:1"), dtype: torch.dtype = torch.bfloat16):
        if dtype != torch.bfloat16:
            raise RolloutError("pipelined rollouts run in bfloat16 (the float32 reference decodes latent by latent)")
        # "cuda" means the first GPU; process groups need explicit indices.
        self.devices = tuple(f"{d}:0" if d == "cuda" else d for d in devices)
        self.backend = "nccl" if all(d.startswith("cuda") for d in self.devices) else "gloo"
        if self.backend == "nccl" and torch.cuda.device_count() < 2:
            raise RolloutError(f"a two-GPU pipeline needs 2 CUDA devices; this machine has {torch.cuda.device_count()}")
        self.build_models = build_models
        self.last_accel_stats = AccelStats()
        # Each rank's peak memory over its rollout (worldplay.allocator.read_peaks), once the stream has ended.
        self.last_peaks: dict[str, dict] = {}

    def rollout(self, image: torch.Tensor, text_states: torch.Tensor, trajectory: Trajectory,
                settings: RolloutSettings, *, keep_frames: bool = True) -> Iterator[ChunkOutput]:
        """One rollout over the two devices, chunk by chunk (each rank's peak memory in
        ``last_peaks`` at the end). ``keep_frames=False``: the frames stay on rank 1 (``frames``
        is empty), for benchmarks. Besides the one-device stages,
        ``timings_ms`` has rank 1's ``decode`` and ``recv_wait`` and, from chunk 1 on,
        ``interval``, ``sent_interval`` and ``pipelined`` (see the module doc)."""
        trajectory.for_chunks(settings.num_chunk)  # errors before any process starts
        records = mp.get_context("spawn").Queue()
        args = (_free_port(), self.build_models, image.cpu(), text_states.cpu(), trajectory,
                dataclasses.replace(settings, decode=True), self.devices, self.backend, keep_frames, records)
        workers = mp.start_processes(_worker, args=args, nprocs=2, join=False, start_method="spawn")
        try:
            yield from self._collect(workers, records, settings.num_chunk, tuple(image.shape[-2:]))
        finally:
            for process in workers.processes:  # a stream abandoned half-way: end its workers
                if process.is_alive():
                    process.terminate()
                    process.join()

    def _collect(self, workers, records, num_chunk: int, size: tuple[int, int]) -> Iterator[ChunkOutput]:
        halves: dict[str, dict[int, dict]] = {"dit": {}, "decode": {}}
        ends: dict[str, object] = {}  # "accel" (rank 0's counters), "peak0", "peak1" (each rank's peaks)
        previous = None
        for index in range(num_chunk):
            while index not in halves["dit"] or index not in halves["decode"]:
                kind, i, payload = self._receive(workers, records)
                if kind in halves:
                    halves[kind][i] = payload
                else:
                    ends[kind if i is None else f"{kind}{i}"] = payload
            dit, dec = halves["dit"].pop(index), halves["decode"].pop(index)
            frames = (torch.from_numpy(dec["frames"]) if dec["frames"] is not None
                      else torch.empty(0, *size, 3, dtype=torch.uint8))
            out = ChunkOutput(index=index, frames=frames, latents=torch.from_numpy(dit["latents"]),
                              memory=dit["memory"],
                              timings_ms={**dit["timings_ms"], "decode": dec["decode_ms"], "recv_wait": dec["recv_wait_ms"]},
                              clock_s={"sent": dit["sent_s"], "ready": dec["ready_s"]})
            if previous is not None:
                t = out.timings_ms
                t["interval"] = (out.clock_s["ready"] - previous.clock_s["ready"]) * 1e3
                t["sent_interval"] = (out.clock_s["sent"] - previous.clock_s["sent"]) * 1e3
                t["pipelined"] = max(t["interval"], t["sent_interval"])
            previous = out
            yield out
        while len(ends) < 3:
            kind, i, payload = self._receive(workers, records)
            ends[kind if i is None else f"{kind}{i}"] = payload
        self.last_accel_stats = AccelStats(**ends["accel"])
        self.last_peaks = {"rank0 (DiT)": ends["peak0"], "rank1 (decode)": ends["peak1"]}
        while not self._join(workers, timeout=None):
            pass

    def _receive(self, workers, records) -> tuple[str, int | None, object]:
        """The next record from a worker; a failed worker raises :class:`PipelineError`."""
        while True:
            try:
                return records.get(timeout=0.2)
            except queue.Empty:
                pass
            if self._join(workers, timeout=0):  # every worker has exited, and cleanly
                try:
                    return records.get(timeout=5)
                except queue.Empty:
                    raise PipelineError("the pipeline workers exited before sending every chunk") from None

    def _join(self, workers, timeout) -> bool:
        try:
            return workers.join(timeout=timeout)
        except mp.ProcessRaisedException as exc:
            trace = exc.msg.split("terminated with the following error:", 1)[-1].strip()
            raise PipelineError(f"a pipeline worker failed: {trace.splitlines()[-1]}\n"
                                f"rank {exc.error_index} ({self.devices[exc.error_index]}):\n{trace}") from None
        except mp.ProcessExitedException as exc:
            raise PipelineError(f"a pipeline worker failed: rank {exc.error_index} "
                                f"({self.devices[exc.error_index]}) {exc}") from None


def _worker(rank, port, build_models, image, text_states, trajectory, settings, devices, backend, keep_frames,
            records) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    device = torch.device(devices[rank])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=2, device_id=device if device.type == "cuda" else None)
    try:
        models = build_models(device)
        if rank == 1:
            decoder = DecodeRunner(models.vae, DecodeOptions.for_settings(settings))
            _warm_up_decoder(decoder, models, image, device)
        dist.barrier()  # rank 0 starts the rollout once the decoder is ready
        reset_peaks(device)  # each rank's peak covers its part of the rollout (its models included)
        if rank == 0:
            _dit_side(models, image, text_states, trajectory, settings, device, records)
        else:
            _decode_side(decoder, models, image, settings, device, keep_frames, records)
        records.put(("peak", rank, read_peaks(device)))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _dit_side(models, image, text_states, trajectory, settings, device, records) -> None:
    pipe = WorldPlayPipeline(models.dit, models.vae, device=device)
    pending = []
    for chunk in pipe.rollout(image, text_states, trajectory, dataclasses.replace(settings, decode=False)):
        # isend, never waited on until the end: a blocking send would make the DiT's stream wait
        # until the decoder has posted its receive, so a busy decoder would stall the DiT (the
        # first two-GPU bench showed such stalls). The chunk's latents are a fresh tensor that
        # nothing overwrites; the process group keeps it alive until the transfer is done.
        latents = chunk.device_latents.contiguous()
        pending.append((dist.isend(latents, dst=1), latents))  # the tensor is held until the end
        sent = time.perf_counter()
        # By value (numpy pickles its bytes): a shared-memory tensor would have to outlive this process.
        records.put(("dit", chunk.index, {"timings_ms": chunk.timings_ms, "sent_s": sent, "memory": chunk.memory,
                                          "latents": chunk.latents.numpy()}))
    for work, _ in pending:
        work.wait()
    records.put(("accel", None, pipe.last_accel_stats.to_dict()))


def _latent_shape(models, image) -> tuple[int, int, int, int, int]:
    spatial = models.vae.config.scale_factor_spatial
    return (1, models.dit.config.in_channels, CHUNK_LATENTS, image.shape[-2] // spatial, image.shape[-1] // spatial)


@torch.no_grad()
def _warm_up_decoder(decoder: DecodeRunner, models, image, device) -> None:
    """Decode two chunks of zeros on a scratch stream: the first (fresh-stream) call and the
    steady call, so that compiling the steady decoder does not happen inside the timed rollout."""
    shape = _latent_shape(models, image)
    scratch = decoder.new_decode_state(1, shape[3], shape[4], device=device, dtype=next(models.vae.parameters()).dtype)
    zeros = torch.zeros(shape, dtype=torch.bfloat16, device=device)
    for _ in range(2):
        decoder.decode(zeros, scratch)
    del scratch
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _decode_side(decoder: DecodeRunner, models, image, settings, device, keep_frames: bool, records) -> None:
    shape = _latent_shape(models, image)
    state = decoder.new_decode_state(1, shape[3], shape[4], device=device, dtype=next(models.vae.parameters()).dtype)
    with torch.no_grad():
        for index in range(settings.num_chunk):
            latents = torch.empty(shape, dtype=torch.bfloat16, device=device)
            timer = StageTimer(device)
            dist.recv(latents, src=0)
            timer.mark("recv_wait")
            frames = frames_to_uint8(decoder.decode(latents, state)).cpu()
            timer.mark("decode")
            ready = time.perf_counter()
            stages = timer.read()
            records.put(("decode", index, {"decode_ms": stages["decode"], "recv_wait_ms": stages["recv_wait"],
                                           "ready_s": ready, "frames": frames.numpy() if keep_frames else None}))


def _build_random(preset: str, seed: int, device: torch.device) -> LoadedModels:
    from .models import random_models

    return random_models(preset, seed, device=device)


def random_builder(preset: str, seed: int) -> Callable[[torch.device], LoadedModels]:
    """A picklable ``build_models`` for seeded random weights (benchmarks and tests)."""
    import functools

    return functools.partial(_build_random, preset, seed)
