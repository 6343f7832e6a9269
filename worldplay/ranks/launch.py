"""Starting a group of ranks, ending it together when one rank fails, and refusing ranks that
would not run the same thing.

* :func:`from_environment`: the rank this process is under ``torchrun`` (``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``), or None for a plain one-process run.
* :func:`join`: ``torch.distributed.init_process_group`` (NCCL on GPUs, gloo on the CPU) and
  the :class:`~worldplay.ranks.group.RankGroup` of this process.
* :class:`Watchdog`: a thread per rank that beats a heartbeat into the group's store and watches
  the others. A rank whose run fails records its one-line error there (the first one wins); the
  others leave at once with that error and status, running their clean-up first (rank 0 deletes
  its partial MP4): they may be blocked inside a collective that would only time out. A rank
  whose process died (no error recorded, no heartbeat) is named after ``stale_s``, or as soon as
  a collective with it fails (:meth:`Watchdog.cause`).
* :func:`check_agreement`: all ranks gather each other's settings, inputs and weights identity;
  the first difference from rank 0 is a one-line error on every rank.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .group import TRANSPORTS, RankGroup, unknown_transport

ERROR_KEY = "worldplay/error"
HEARTBEAT = "worldplay/alive/{}"
# A collective that waits longer than this is a hang (the longest legitimate wait is a peer
# compiling or loading weights at another pace): torch.distributed raises then.
COLLECTIVE_TIMEOUT_S = 1800


class RankError(ValueError):
    """A launch that cannot work (bad launcher variables, ranks that disagree); exit status 2."""


@dataclass(frozen=True)
class Launch:
    rank: int
    size: int
    local_rank: int


def from_environment(environ: Mapping[str, str] = os.environ) -> Launch | None:
    """This process's rank under ``torchrun`` (None without it, or with one process)."""
    if "WORLD_SIZE" not in environ:
        return None
    values = {}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        text = environ.get(name, "0" if name != "WORLD_SIZE" else "")
        if not text.isdigit():
            raise RankError(f"{name}={text!r} is not a rank number; launch with torchrun --nproc-per-node N -m "
                            "worldplay ... (it sets RANK, WORLD_SIZE and LOCAL_RANK)")
        values[name] = int(text)
    size, rank = values["WORLD_SIZE"], values["RANK"]
    if size < 1 or rank >= size:
        raise RankError(f"RANK={rank} is not one of the {size} ranks of WORLD_SIZE={size}")
    if size == 1:
        return None
    return Launch(rank=rank, size=size, local_rank=values["LOCAL_RANK"])


def join(rank: int, size: int, device: torch.device, *, timeout_s: float = COLLECTIVE_TIMEOUT_S,
         transport: str = "direct") -> RankGroup:
    """Join the process group (``MASTER_ADDR``/``MASTER_PORT`` from the environment) as ``rank``
    of ``size`` on ``device``; NCCL for CUDA devices, gloo for the CPU, or gloo over host copies
    for ``transport="host"`` (ranks sharing a GPU, :class:`~worldplay.ranks.group.HostStagedRankGroup`)."""
    if problem := unknown_transport(transport):
        raise RankError(problem)
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    nccl = cuda and transport == "direct"
    dist.init_process_group("nccl" if nccl else "gloo", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=timeout_s), device_id=device if nccl else None)
    return TRANSPORTS[transport](rank, size, device, dist.group.WORLD)


def leave(group: RankGroup) -> None:
    """The end of a run that every rank finished: wait for all of them, then close the group."""
    group.barrier()
    dist.destroy_process_group()


class Watchdog:
    """Ends this rank when another fails (see the module doc). ``exit_fn(status)`` ends the
    process (``os._exit``: the main thread may be blocked in a collective, where no exception
    reaches it); ``on_abort`` callbacks run before it (clean-up), with the message."""

    def __init__(self, group: RankGroup, *, prog: str = "worldplay", poll_s: float = 0.2, stale_s: float = 60.0,
                 exit_fn: Callable[[int], None] = os._exit):
        self.group = group
        self.store = dist.distributed_c10d._get_default_store()
        self.prog, self.poll_s, self.stale_s, self.exit_fn = prog, poll_s, stale_s, exit_fn
        self.on_abort: list[Callable[[str], None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"worldplay-watchdog-{group.rank}", daemon=True)
        self._seen: dict[int, tuple[int, float]] = {}  # peer -> (heartbeat count, when it last moved)

    def __enter__(self) -> Watchdog:
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()

    # -- this rank failed -----------------------------------------------------------------

    def fail(self, message: str, status: int) -> tuple[int, str, int]:
        """Record this rank's failure for the others (unless one was recorded first) and stop
        watching. Returns the failure that stands: (rank, message, status)."""
        self.stop()
        mine = json.dumps({"rank": self.group.rank, "message": message, "status": status})
        try:
            first = self.store.compare_set(ERROR_KEY, "", mine)
            stored = json.loads(first if isinstance(first, str) else first.decode())
        except Exception:  # noqa: BLE001 - the store's host is gone: this rank's error is all there is
            return self.group.rank, message, status
        return stored["rank"], stored["message"], stored["status"]

    def cause(self, wait_s: float = 3.0) -> tuple[int, str, int] | None:
        """After a collective failed: the peer failure behind it, if one shows within ``wait_s``
        (a recorded error, or a peer whose heartbeat stopped), else None."""
        deadline = time.monotonic() + wait_s
        counts = self._counts()
        while time.monotonic() < deadline:
            recorded = self._recorded()
            if recorded is not None and recorded[0] != self.group.rank:
                return recorded
            time.sleep(self.poll_s)
        now = self._counts()
        for peer, count in now.items():
            if count is None or count == counts.get(peer):
                return peer, f"rank {peer} stopped responding (its process ended)", 1
        return None

    # -- watching the others ----------------------------------------------------------------

    def _beat(self) -> None:
        self.store.add(HEARTBEAT.format(self.group.rank), 1)

    def _counts(self) -> dict[int, int | None]:
        out = {}
        for peer in range(self.group.size):
            if peer != self.group.rank:
                try:
                    out[peer] = self.store.add(HEARTBEAT.format(peer), 0)
                except Exception:  # noqa: BLE001 - the store is gone with its host (rank 0)
                    out[peer] = None
        return out

    def _recorded(self) -> tuple[int, str, int] | None:
        if not self.store.check([ERROR_KEY]):
            return None
        raw = self.store.get(ERROR_KEY)
        stored = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        return stored["rank"], stored["message"], stored["status"]

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._beat()
                recorded = self._recorded()
                if recorded is not None and recorded[0] != self.group.rank:
                    self._abort(*recorded)
                    return
                now = time.monotonic()
                for peer, count in self._counts().items():
                    if count is None:
                        raise ConnectionError("store gone")
                    last = self._seen.get(peer)
                    if last is None or last[0] != count:
                        self._seen[peer] = (count, now)
                    elif now - last[1] > self.stale_s:
                        self._abort(peer, f"rank {peer} stopped responding for {self.stale_s:.0f} s (its process "
                                          "ended or hangs)", 1)
                        return
            except Exception:  # noqa: BLE001 - the store's host (rank 0's process) is gone
                if self._stop.is_set():
                    return
                self._abort(0, "rank 0 ended (the group's store went with it)", 1)
                return

    def _abort(self, rank: int, message: str, status: int) -> None:
        line = message if message.startswith(f"rank {rank} ") else f"rank {rank} failed: {message}"
        for callback in self.on_abort:
            try:
                callback(line)
            except Exception:  # noqa: BLE001 - clean-up is best effort on the way out
                pass
        print(f"{self.prog} (rank {self.group.rank} of {self.group.size}): error: {line}; this rank stopped, "
              "nothing was written", file=sys.stderr, flush=True)
        self.exit_fn(status)


def check_agreement(group: RankGroup, facts: Mapping[str, Any]) -> None:
    """Refuse (RankError, the same on every rank) ranks whose ``facts`` differ from rank 0's:
    settings, inputs (digests), weights identity. Values are shown shortened."""
    every = group.all_gather_object(dict(facts))
    reference = every[0]
    for rank, other in enumerate(every[1:], start=1):
        for key in [*reference, *(k for k in other if k not in reference)]:
            if reference.get(key) != other.get(key):
                raise RankError(f"rank {rank} runs with {key} = {_short(other.get(key))} but rank 0 with "
                                f"{_short(reference.get(key))}; start every rank with the same arguments, inputs "
                                "and weights")


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (inputs compared across ranks)."""
    import hashlib

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def session_facts(settings, image: torch.Tensor, text_states: torch.Tensor, trajectory) -> dict[str, Any]:
    """What every rank of one session must agree on before any model work."""
    import dataclasses

    import numpy as np

    poses = np.concatenate([np.asarray(trajectory.viewmats).ravel(), np.asarray(trajectory.intrinsics).ravel(),
                            np.asarray(trajectory.actions, dtype=np.float64).ravel()])
    return {"settings": dataclasses.asdict(settings), "image": digest(image), "prompt": digest(text_states),
            "trajectory": digest(torch.from_numpy(poses))}


def weights_facts(models) -> dict[str, Any]:
    """The weights' identity, and digests of two output layers (one per model): the same
    identity over different files would still differ there."""
    return {"weights": models.identity, "dit_proj_out": digest(models.dit.proj_out.weight),
            "vae_conv_out": digest(models.vae.decoder.conv_out.weight)}


def collective_error(exc: BaseException) -> bool:
    """An error raised by a collective (a peer vanished), not by this rank's own work."""
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and "gloo" in str(exc).lower())


def failure_line(origin: int, message: str) -> str:
    return message if message.startswith(f"rank {origin} ") else f"rank {origin} failed: {message}"


class RankedRun:
    """``with RankedRun(launch, device, ...) as run:`` one rank of a ``torchrun`` launch: joins
    the group, watches the others, and on the way out either closes the group (:meth:`finish`,
    once every rank is done) or reports this rank's failure to the others. An error caused by
    another rank's failure (a collective that broke) becomes ``peer_error(line, status)`` with
    that rank's error and status. ``describe(exc)`` gives an error's (status, line), or None for
    an unforeseen one (status 1)."""

    def __init__(self, launch: Launch, device: torch.device, *, prog: str, describe, peer_error):
        self.launch, self.device, self.prog = launch, torch.device(device), prog
        self.describe, self.peer_error = describe, peer_error
        self.ranks: RankGroup | None = None
        self.watchdog: Watchdog | None = None
        self.on_abort: list[Callable[[str], None]] = []
        self._finished = False

    @property
    def leader(self) -> bool:
        return self.launch.rank == 0

    def broadcast_object(self, obj):
        return self.ranks.broadcast_object(obj)

    def __enter__(self) -> RankedRun:
        self.ranks = join(self.launch.rank, self.launch.size, self.device)
        self.watchdog = Watchdog(self.ranks, prog=self.prog)
        self.watchdog.on_abort = self.on_abort
        self.watchdog.__enter__()
        return self

    def finish(self) -> None:
        """Every rank's work is done: stop watching, wait for the others, close the group."""
        if not self._finished:
            self._finished = True
            self.watchdog.stop()
            leave(self.ranks)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            self.finish()
            return False
        if isinstance(exc, KeyboardInterrupt):
            self.watchdog.fail("interrupted", 130)
            return False
        status, line = self.describe(exc) or (1, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        stands = self.watchdog.cause() if collective_error(exc) else None
        origin, message, status = stands or self.watchdog.fail(line, status)
        if origin != self.launch.rank:
            raise self.peer_error(failure_line(origin, message), status) from None
        return False
