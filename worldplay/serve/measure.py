"""What a player sees, computed from a log of frame arrivals: playback times, stalls, sustained
frame rate, key-to-frame latency, and whether the server's chunk actions are the script's.

Pure arithmetic (no sockets, no clock), so that the scripted client
(:mod:`worldplay.serve.client`) and the ``interactive`` experiment share one definition and the
tests can check it on made-up logs.

Definitions (``period`` = 1 / the stream's frame rate, 1/16 s):

* **playback**: a frame is shown when it has arrived and one period after the previous frame
  was shown, whichever is later (the first frame when it arrives): ``shown[i] = max(arrived[i],
  shown[i-1] + period)``. This is the page's player, without its timer jitter.
* **stall**: a frame shown more than :data:`STALL_GAP_PERIODS` periods after the previous one
  (at 16 fps: a gap over 93.75 ms; half a period of slack absorbs send and timer jitter, which a
  viewer does not notice). A stall's length is its gap beyond one period.
* **sustained fps**: over the steady part (frames of chunk ``from_chunk`` on; chunk 0 carries
  the start-up), ``(frames - 1) / (last shown - first shown)``. Playback is paced, so this is the
  target rate when nothing stalls and less when generation falls behind.
* **key-to-frame latency** of a key change: from sending it to showing the first frame of the
  first chunk whose action was sampled after the server had it (the server echoes, per chunk,
  the last change number ``seq`` it had seen; the first chunk with ``seq >= change`` is the
  first that can show the change).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .keys import KeySampler

#: A gap between two shown frames longer than this many frame periods is a stall.
STALL_GAP_PERIODS = 1.5

__all__ = ["STALL_GAP_PERIODS", "Arrival", "KeyChange", "chunk_starts", "expected_keys", "latencies", "playback",
           "stalls", "sustained_fps"]


@dataclass(frozen=True)
class Arrival:
    """Frame ``frame`` of chunk ``chunk`` arrived at ``at_s`` (seconds, any fixed origin)."""

    chunk: int
    frame: int
    at_s: float


@dataclass(frozen=True)
class KeyChange:
    """Change number ``seq``: from ``sent_s`` the client holds exactly ``keys``."""

    seq: int
    keys: frozenset[str]
    sent_s: float


def playback(arrivals: Sequence[Arrival], period: float) -> list[float]:
    """When each frame (in arrival order) is shown."""
    shown: list[float] = []
    for a in arrivals:
        shown.append(a.at_s if not shown else max(a.at_s, shown[-1] + period))
    return shown


def stalls(shown: Sequence[float], period: float) -> list[tuple[int, float]]:
    """``(index of the late frame, stall length in s)`` for every gap over
    :data:`STALL_GAP_PERIODS` periods."""
    return [(i, shown[i] - shown[i - 1] - period) for i in range(1, len(shown))
            if shown[i] - shown[i - 1] > STALL_GAP_PERIODS * period]


def sustained_fps(arrivals: Sequence[Arrival], shown: Sequence[float], from_chunk: int = 1) -> float | None:
    """Frames shown per second from the first frame of chunk ``from_chunk`` on (None: under two frames)."""
    steady = [t for a, t in zip(arrivals, shown, strict=True) if a.chunk >= from_chunk]
    if len(steady) < 2 or steady[-1] <= steady[0]:
        return None
    return (len(steady) - 1) / (steady[-1] - steady[0])


def chunk_starts(arrivals: Sequence[Arrival], shown: Sequence[float]) -> dict[int, float]:
    """Chunk -> when its first frame was shown."""
    return {a.chunk: t for a, t in zip(arrivals, shown, strict=True) if a.frame == 0}


def latencies(changes: Iterable[KeyChange], chunk_seq: Mapping[int, int],
              starts: Mapping[int, float]) -> list[dict]:
    """Per key change: the first chunk that saw it (``None`` if none shown did) and the time from
    sending it to that chunk's first frame (``latency_s``)."""
    out = []
    for change in changes:
        seen = [c for c, seq in chunk_seq.items() if seq >= change.seq and c in starts]
        chunk = min(seen) if seen else None
        out.append({"seq": change.seq, "keys": sorted(change.keys), "sent_s": change.sent_s, "chunk": chunk,
                    "latency_s": None if chunk is None else starts[chunk] - change.sent_s})
    return out


def expected_keys(changes: Sequence[KeyChange], chunk_seq: Mapping[int, int]) -> dict[int, tuple[str, ...]]:
    """Chunk -> the keys the server should have sampled for it: the script's changes up to the
    chunk's echoed ``seq``, replayed through a :class:`~worldplay.serve.keys.KeySampler` (so a
    key pressed and released between two chunks counts, as the server counts it)."""
    sampler = KeySampler()
    pending = sorted(changes, key=lambda c: c.seq)
    out = {}
    for chunk in sorted(chunk_seq):
        while pending and pending[0].seq <= chunk_seq[chunk]:
            change = pending.pop(0)
            sampler.keys(change.keys, change.seq)
        out[chunk] = sampler.sample().keys
    return out
