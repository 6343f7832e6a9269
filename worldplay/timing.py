"""The one timer of the package: CUDA events on a GPU (recorded without synchronising, read
once per chunk), ``time.perf_counter`` on the CPU. The native rollout (:class:`StageTimer`) and
the official leg (:class:`Clock`) time their stages the same way.
"""

from __future__ import annotations

import time

import torch


class Clock:
    """Time stamps and the milliseconds between two of them."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def stamp(self):
        """A point in time: a recorded CUDA event (no synchronisation) or perf_counter seconds."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, end) -> float:
        """Milliseconds from ``start`` to ``end`` (CUDA: both events must have completed)."""
        if self.cuda:
            return float(start.elapsed_time(end))
        return (end - start) * 1000.0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class StageTimer:
    """Stage boundaries as CUDA events (GPU) or perf_counter (CPU), read once per chunk.

    ``mark(name)`` closes the stage ``name`` that started at the previous mark; nothing
    synchronises until ``read()``, which the rollout calls after
    the chunk's frames have been copied to the host anyway.
    """

    def __init__(self, device: torch.device):
        self.clock = Clock(device)
        self.names: list[str] = []
        self.points: list = []
        self._start()

    @property
    def cuda(self) -> bool:
        return self.clock.cuda

    def _start(self) -> None:
        self.points = [self.clock.stamp()]
        self.names = []

    def mark(self, name: str) -> None:
        self.names.append(name)
        self.points.append(self.clock.stamp())

    def read(self) -> dict[str, float]:
        if self.cuda:
            self.points[-1].synchronize()
        spans = [self.clock.ms(a, b) for a, b in zip(self.points, self.points[1:], strict=False)]
        out: dict[str, float] = {}
        for name, ms in zip(self.names, spans, strict=True):
            out[name] = out.get(name, 0.0) + ms
        self._start()
        return out
