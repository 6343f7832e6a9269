"""A session over N ranks started from this process: one spawned process per rank (the
benches, the drift legs and the tests; ``torchrun -m worldplay run`` starts the ranks itself).

Every rank builds its models with ``build_models`` (picklable: a module-level function or a
partial of one), checks that it agrees with the others (:func:`~worldplay.ranks.launch.check_agreement`)
and runs :meth:`worldplay.rollout.WorldPlayPipeline.rollout` with its
:class:`~worldplay.ranks.group.RankGroup`; rank 0 streams each chunk back through a queue as
it is done, so :meth:`MultiRankPipeline.rollout` yields the same
:class:`~worldplay.rollout.ChunkOutput` records as a one-process rollout. A rank that fails
ends the others (:class:`~worldplay.ranks.launch.Watchdog`), and the stream raises
:class:`RanksFailed` with the failing rank's one-line error.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from collections.abc import Callable, Iterator

import torch
import torch.multiprocessing as mp

from ..accel import AccelStats
from ..allocator import read_peaks, reset_peaks
from ..rollout import ChunkOutput, RolloutError, RolloutSettings, WorldPlayPipeline
from .group import unknown_transport


class RanksFailed(RuntimeError):
    """A rank failed; the first line is its error, the rest its traceback (when it had one)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_devices(ranks: int, transport: str = "direct") -> tuple[str, ...]:
    """``cuda:0 .. cuda:N-1`` where there are that many GPUs (``cuda:0`` for every rank with
    ``transport="host"``), else the CPU for every rank."""
    if torch.cuda.is_available():
        if transport == "host":
            return ("cuda:0",) * ranks
        if torch.cuda.device_count() < ranks:
            raise RolloutError(f"{ranks} ranks need {ranks} GPUs; this machine has {torch.cuda.device_count()}")
        return tuple(f"cuda:{i}" for i in range(ranks))
    return ("cpu",) * ranks


class MultiRankPipeline:
    """:class:`~worldplay.rollout.WorldPlayPipeline` over ``ranks`` processes (one device each)
    with the models ``build_models(device)`` gives every rank, in ``dtype``. ``transport``:
    ``"direct"`` (NCCL between GPUs, gloo on the CPU) or ``"host"`` (gloo over host copies, which
    lets the ranks share one GPU: the sharded arithmetic at full size on one card, slowly, and
    without CUDA graphs; :class:`~worldplay.ranks.group.HostStagedRankGroup`). After a stream:
    ``last_accel_stats`` (rank 0's counters), ``last_peaks`` (each rank's peak memory) and
    ``last_traffic`` (each rank's bytes sent, by purpose)."""

    def __init__(self, build_models: Callable, *, ranks: int, devices: tuple[str, ...] | None = None,
                 dtype: torch.dtype = torch.bfloat16, transport: str = "direct"):
        if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
            raise RolloutError(f"ranks must be a positive number, got {ranks!r}")
        if problem := unknown_transport(transport):
            raise RolloutError(problem)
        devices = default_devices(ranks, transport) if devices is None else tuple(devices)
        if len(devices) != ranks:
            raise RolloutError(f"{ranks} ranks need {ranks} devices, got {list(devices)}")
        gpus = [d for d in devices if d.startswith("cuda")]
        mixed = 0 < len(gpus) < ranks
        shared = len(set(gpus)) < len(gpus)  # NCCL refuses that; host copies allow it
        if mixed or (shared and transport != "host"):
            raise RolloutError(f"the ranks need one GPU each or the CPU each, got {list(devices)} (transport='host' "
                               "lets them share one GPU, as a check of the arithmetic rather than for speed)")
        self.build_models, self.ranks, self.devices, self.dtype = build_models, ranks, devices, dtype
        self.transport = transport
        self.last_accel_stats = AccelStats()
        self.last_peaks: dict[str, dict] = {}
        self.last_traffic: dict[str, dict] = {}

    def rollout(self, image: torch.Tensor, text_states: torch.Tensor, trajectory, settings: RolloutSettings, *,
                keep_frames: bool = True) -> Iterator[ChunkOutput]:
        """One rollout over the ranks, chunk by chunk. ``keep_frames=False``: rank 0 keeps the
        frames to itself (``frames`` is empty; benches)."""
        trajectory.for_chunks(settings.num_chunk)  # errors before any process starts
        if self.transport == "host" and "graphs" in settings.accel and any(d.startswith("cuda") for d in self.devices):
            raise RolloutError(f"accel={settings.accel!r}: a CUDA graph cannot capture the host-staged exchanges "
                               "(transport='host'); use accel='compile'")
        records = mp.get_context("spawn").Queue()
        args = (self.ranks, _free_port(), self.build_models, self.dtype, image.cpu(), text_states.cpu(), trajectory,
                settings, self.devices, self.transport, keep_frames, records)
        workers = mp.start_processes(_worker, args=args, nprocs=self.ranks, join=False, start_method="spawn")
        try:
            yield from self._collect(workers, records, settings.num_chunk, tuple(image.shape[-2:]))
        finally:
            end_workers(workers)  # an abandoned stream or a failure: end the ranks

    def _collect(self, workers, records, num_chunk: int, size: tuple[int, int]) -> Iterator[ChunkOutput]:
        ends: dict[int, dict] = {}
        for index in range(num_chunk):
            kind, rank, payload = self._receive(workers, records)
            while kind == "end":
                ends[rank] = payload
                kind, rank, payload = self._receive(workers, records)
            if kind != "chunk" or payload["index"] != index:
                raise RanksFailed(f"rank 0 sent {kind} {payload.get('index')!r} where chunk {index} was due")
            frames = (torch.from_numpy(payload["frames"]) if payload["frames"] is not None
                      else torch.empty(0, *size, 3, dtype=torch.uint8))
            yield ChunkOutput(index=index, frames=frames, latents=torch.from_numpy(payload["latents"]),
                              memory=payload["memory"], timings_ms=payload["timings_ms"], clock_s=payload["clock_s"])
        while len(ends) < self.ranks:
            kind, rank, payload = self._receive(workers, records)
            if kind == "end":
                ends[rank] = payload
        self.last_accel_stats = AccelStats(**ends[0]["accel"])
        self.last_peaks = {f"rank{r} ({self.devices[r]})": ends[r]["peak"] for r in sorted(ends)}
        self.last_traffic = {f"rank{r}": ends[r]["traffic"] for r in sorted(ends)}
        wait_for_exit(workers)

    @staticmethod
    def _receive(workers, records) -> tuple[str, int, dict]:
        return receive_record(workers, records, lambda rank, payload: payload["line"] + (
            f"\n{payload['trace']}" if payload.get("trace") else ""))


def receive_record(workers, records, error_message: Callable[[int, object], str], *,
                   name: str = "the ranks", context: str = "") -> tuple[str, int, object]:
    """The next ``(kind, rank, payload)`` record the ranks put on ``records``. An ``error``
    record raises :class:`RanksFailed` with ``error_message(rank, payload)``; so does a rank that
    ended without sending one (``context`` prefixes that message), or all of them ending cleanly
    before the caller had every record (``name`` says whose). The one receive loop of every
    multi-process leg (native ranks, the official code at world size N)."""
    while True:
        try:
            kind, rank, payload = records.get(timeout=0.2)
        except queue.Empty:
            ended = _ended(workers)
            if ended is None:
                continue
            if ended == "clean":
                raise RanksFailed(f"{name} exited before sending every chunk") from None
            try:  # a rank failed: its error record (or a peer's) may still be on its way
                kind, rank, payload = records.get(timeout=3)
            except queue.Empty:
                raise RanksFailed(context + ended) from None
        if kind == "error":
            raise RanksFailed(error_message(rank, payload))
        return kind, rank, payload


def wait_for_exit(workers) -> None:
    """Block until every rank has exited (polling, not spinning); a rank that failed raises."""
    while (ended := _ended(workers)) is None:
        time.sleep(0.05)
    if ended != "clean":
        raise RanksFailed(ended)


def end_workers(workers) -> None:
    """Terminate the ranks still running (an abandoned stream or a failure elsewhere)."""
    for process in workers.processes:
        if process.is_alive():
            process.terminate()
            process.join()


def _ended(workers) -> str | None:
    """None while a rank runs; "clean" once all have exited cleanly; else which rank failed
    (``ProcessContext.join`` then ends the others)."""
    try:
        return "clean" if workers.join(timeout=0) else None
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
        return f"rank {exc.error_index} ended: {str(exc).strip().splitlines()[-1]}"


def _worker(rank, size, port, build_models, dtype, image, text_states, trajectory, settings, devices, transport,
            keep_frames, records) -> None:
    from .launch import (
        Watchdog,
        check_agreement,
        collective_error,
        failure_line,
        join,
        leave,
        session_facts,
        weights_facts,
    )

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    device = torch.device(devices[rank])
    group = join(rank, size, device, transport=transport)
    watchdog = Watchdog(group, prog="worldplay ranks")
    watchdog.on_abort.append(lambda line: records.put(("error", rank, {"line": line})))
    with watchdog:
        try:
            check_agreement(group, session_facts(settings, image, text_states, trajectory))
            models = build_models(device)
            check_agreement(group, weights_facts(models))
            pipe = WorldPlayPipeline(models.dit, models.vae, device=device, dtype=dtype, ranks=group)
            reset_peaks(device)
            for out in pipe.rollout(image, text_states, trajectory, settings):
                if group.leader:
                    # By value (numpy pickles its bytes): a shared-memory tensor would have to outlive this process.
                    records.put(("chunk", 0, {
                        "index": out.index, "frames": out.frames.numpy() if keep_frames else None,
                        "latents": out.latents.numpy(), "memory": out.memory, "timings_ms": out.timings_ms,
                        "clock_s": out.clock_s}))
            records.put(("end", rank, {"peak": read_peaks(device), "traffic": dict(group.traffic),
                                       "accel": pipe.last_accel_stats.to_dict()}))
        except BaseException as exc:
            line = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            failed = watchdog.cause() if collective_error(exc) else None
            origin, message, _status = failed or watchdog.fail(line, 1)
            text = failure_line(origin, message)
            records.put(("error", rank, {"line": text, "trace": traceback.format_exc() if origin == rank else ""}))
            raise
    leave(group)

