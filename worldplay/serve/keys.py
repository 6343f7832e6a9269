"""Live controls -> one action per chunk.

The page reports the keys held (WASD move, arrows turn) and mouse movement as they change; the
model takes one action per chunk. :class:`KeySampler` turns what happened since the last
chunk into that action when the next chunk starts: a key counts if it is held at that moment
or was pressed at any time since the last sample (so a tap shorter than a chunk still moves
the camera once), and mouse movement past :data:`LOOK_THRESHOLD_PX` on an axis turns that way.
Opposite keys cancel. The action is a :class:`worldplay.actions.Motion`: the same per-latent
motion as the pose grammar (a held ``w`` for one chunk is ``w-4``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..actions import Motion

#: Mouse travel (CSS pixels, summed over a chunk) that counts as a turn on that axis.
LOOK_THRESHOLD_PX = 6.0


def motion_for(keys: frozenset[str] | set[str], dx: float = 0.0, dy: float = 0.0) -> Motion:
    """The motion of held ``keys`` plus mouse travel ``dx``/``dy`` (screen axes: +x right, +y
    down, so moving the mouse up looks up). Opposite keys cancel; keys win over the mouse."""
    forward = ("w" in keys) - ("s" in keys)
    right = ("d" in keys) - ("a" in keys)
    yaw = ("right" in keys) - ("left" in keys)
    pitch = ("up" in keys) - ("down" in keys)
    if not yaw and abs(dx) >= LOOK_THRESHOLD_PX:
        yaw = 1 if dx > 0 else -1
    if not pitch and abs(dy) >= LOOK_THRESHOLD_PX:
        pitch = -1 if dy > 0 else 1
    translation = {1: "w", -1: "s", 0: ""}[forward] + {1: "d", -1: "a", 0: ""}[right]
    turns = [name for name in ({1: "right", -1: "left"}.get(yaw), {1: "up", -1: "down"}.get(pitch)) if name]
    return Motion(translation or "none", "+".join(turns) or "none")


@dataclass(frozen=True)
class Sample:
    """What a chunk was generated with: the keys that counted, the mouse travel, the motion and
    the last client sequence number seen (``seq``)."""

    keys: tuple[str, ...]
    dx: float
    dy: float
    motion: Motion
    seq: int


class KeySampler:
    """Accumulates the page's key and mouse reports between chunks, sampled once per chunk."""

    def __init__(self) -> None:
        self.held: frozenset[str] = frozenset()
        self._pressed: set[str] = set()
        self._dx = self._dy = 0.0
        self.seq = 0

    def keys(self, down: frozenset[str], seq: int) -> None:
        """The page holds exactly ``down`` now (change number ``seq``)."""
        self._pressed |= down - self.held
        self.held = down
        self.seq = max(self.seq, seq)

    def look(self, dx: float, dy: float, seq: int) -> None:
        """The mouse moved by ``dx``, ``dy`` pixels (change number ``seq``)."""
        self._dx += dx
        self._dy += dy
        self.seq = max(self.seq, seq)

    def release_all(self) -> None:
        """The page lost focus, or the world starts over: nothing is held."""
        self.held = frozenset()
        self._pressed.clear()
        self._dx = self._dy = 0.0

    def sample(self) -> Sample:
        """The next chunk's keys and motion; taps and mouse travel start again from nothing."""
        keys = self.held | self._pressed
        out = Sample(tuple(sorted(keys)), self._dx, self._dy, motion_for(keys, self._dx, self._dy), self.seq)
        self._pressed.clear()
        self._dx = self._dy = 0.0
        return out
