"""A chunk's camera conditioning, from a scripted trajectory or from live controls.

The model is steered per latent by a world-to-camera matrix, normalised intrinsics and one of
the official 81 action labels (``translation_class * 9 + rotation_class``, read off the relative
motion between consecutive poses by :func:`worldplay.pose.action_labels`). A session consumes
them one chunk (4 latents) at a time as :class:`ChunkPoses`, whichever driver made them:

* a scripted :class:`~worldplay.pose.Trajectory` (pose string or JSON file):
  :func:`chunk_poses` slices it;
* live controls: a :class:`Motion` (one translation x one rotation, the same motion the pose
  grammar produces for one latent step) held for a whole chunk, or a camera delta (a relative
  4x4 camera-to-camera transform per latent step), integrated from the current pose by
  :class:`Steering`.

A held ``w`` for one chunk is the pose string ``w-4`` (``w-3`` for chunk 0, whose first latent
is the image at the start pose), bit for bit: single motions repeat exactly the operations of
:func:`worldplay.pose.camera_path` (the tests check it against pose strings).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .constants import CHUNK_LATENTS as CHUNK_STEPS  # latents (action steps) per chunk
from .pose import (
    ACTIONS,
    DEFAULT_K,
    PoseCommand,
    PoseError,
    Trajectory,
    action_labels,
    camera_path,
    normalize_intrinsics,
)

#: Translation classes in the official label order (bits forward, backward, right, left).
TRANSLATIONS = ("none", "w", "s", "d", "a", "wd", "wa", "sd", "sa")
#: Rotation classes in the official label order (bits yaw right, yaw left, pitch up, pitch down).
ROTATIONS = ("none", "right", "left", "up", "down", "right+up", "right+down", "left+up", "left+down")
NUM_LABELS = len(TRANSLATIONS) * len(ROTATIONS)  # 81


@dataclass(frozen=True)
class Motion:
    """One latent step of live control: a translation and a rotation, each a class name.

    The names are those of :data:`~worldplay.actions.TRANSLATIONS` and
    :data:`~worldplay.actions.ROTATIONS` (``Motion("wa", "right")``: forward-left while turning
    right). Its :attr:`label` is the official label that the step produces."""

    translation: str = "none"
    rotation: str = "none"

    def __post_init__(self) -> None:
        if self.translation not in TRANSLATIONS:
            raise PoseError(f"translation {self.translation!r} unknown; use one of {', '.join(TRANSLATIONS)}",
                            token=str(self.translation))
        if self.rotation not in ROTATIONS:
            raise PoseError(f"rotation {self.rotation!r} unknown; use one of {', '.join(ROTATIONS)}",
                            token=str(self.rotation))

    @classmethod
    def from_label(cls, label: int) -> Motion:
        """The motion of an official label 0..80."""
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < NUM_LABELS:
            raise PoseError(f"action label {label!r} is not an integer in 0..{NUM_LABELS - 1}", token=str(label))
        return cls(TRANSLATIONS[int(label) // len(ROTATIONS)], ROTATIONS[int(label) % len(ROTATIONS)])

    @property
    def label(self) -> int:
        """The official label 0..80, ``translation_class * 9 + rotation_class``."""
        return TRANSLATIONS.index(self.translation) * len(ROTATIONS) + ROTATIONS.index(self.rotation)

    @property
    def moves(self) -> tuple[str, ...]:
        """Pose-grammar actions of the translation, e.g. ``("w", "a")``."""
        return () if self.translation == "none" else tuple(self.translation)

    @property
    def turns(self) -> tuple[str, ...]:
        """Pose-grammar actions of the rotation, e.g. ``("right", "up")`` (yaw first)."""
        return () if self.rotation == "none" else tuple(self.rotation.split("+"))


def _step_rotations() -> dict[str, np.ndarray]:
    """Per-step rotation of each turn action, read off :func:`camera_path` from the identity
    (``I @ R`` is ``R`` exactly), so it is the pose grammar's own matrix."""
    return {a: camera_path([PoseCommand(a, 1)])[1][:3, :3].copy() for a, (kind, _) in ACTIONS.items()
            if kind in ("yaw", "pitch")}


_TURN_MATRIX = _step_rotations()


def advance(c2w: np.ndarray, motion: Motion) -> np.ndarray:
    """The camera-to-world pose one latent step of ``motion`` after ``c2w`` (a new array).

    Translations first (in the camera's current frame, so the label reads the move in the frame
    of the previous pose), then yaw, then pitch: each with exactly the in-place operation
    :func:`worldplay.pose.camera_path` uses for that action."""
    T = np.array(c2w, dtype=np.float64)
    for action in motion.moves:
        kind, amount = ACTIONS[action]
        offset = np.array([0, 0, amount]) if kind == "forward" else np.array([amount, 0, 0])
        T[:3, 3] += T[:3, :3] @ offset
    for action in motion.turns:
        T[:3, :3] = T[:3, :3] @ _TURN_MATRIX[action]
    return T


@dataclass(frozen=True, eq=False)
class ChunkPoses:
    """What one chunk is conditioned on, per latent: ``c2w [n, 4, 4]`` and ``viewmats [n, 4, 4]``
    (float64), ``intrinsics [n, 3, 3]`` (float64, normalised), ``actions [n]`` (int64 labels);
    ``n`` = 4. ``c2w[-1]`` is where the next chunk starts from."""

    c2w: np.ndarray
    viewmats: np.ndarray
    intrinsics: np.ndarray
    actions: np.ndarray

    def __post_init__(self) -> None:
        n = CHUNK_STEPS
        for name, shape, dtype in (("c2w", (n, 4, 4), np.float64), ("viewmats", (n, 4, 4), np.float64),
                                   ("intrinsics", (n, 3, 3), np.float64), ("actions", (n,), np.int64)):
            value = getattr(self, name)
            if not isinstance(value, np.ndarray) or value.shape != shape or value.dtype != dtype:
                got = f"{value.dtype} {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
                raise PoseError(f"ChunkPoses.{name} must be {np.dtype(dtype)} {shape}, got {got}", token=name)
            if name != "actions" and not np.isfinite(value).all():
                raise PoseError(f"ChunkPoses.{name} has non-finite values", token=name)
        if self.actions.min() < 0 or self.actions.max() >= NUM_LABELS:
            raise PoseError(f"ChunkPoses.actions must be labels in 0..{NUM_LABELS - 1}", token="actions")


def chunk_poses(trajectory: Trajectory, chunk: int) -> ChunkPoses:
    """Latents ``4 chunk .. 4 chunk + 3`` of a scripted trajectory (labels as computed on the
    whole trajectory, like the official code slices them)."""
    window = slice(chunk * CHUNK_STEPS, (chunk + 1) * CHUNK_STEPS)
    if window.stop > len(trajectory):
        raise PoseError(f"trajectory {trajectory.source} has {len(trajectory)} latents; chunk {chunk} needs "
                        f"latents up to {window.stop - 1}", token=trajectory.source)
    return ChunkPoses(c2w=trajectory.c2w[window], viewmats=trajectory.viewmats[window],
                      intrinsics=trajectory.intrinsics[window], actions=trajectory.actions[window])


class Steering:
    """The camera of a live session: integrates one motion (or camera delta) per chunk from the
    current pose. Chunk 0 starts at the identity (the image's camera), as pose strings do.

    ``third_person``: the labels of the official ``tps=True`` mode (a camera orbiting a
    character: a step that turns keeps only its rotation class; see
    :func:`worldplay.pose.action_labels`)."""

    def __init__(self, K: np.ndarray = DEFAULT_K, *, third_person: bool = False):
        self.third_person = third_person
        self._intrinsics = normalize_intrinsics(np.broadcast_to(K, (CHUNK_STEPS, 3, 3)))
        self.pose: np.ndarray | None = None  # c2w of the last latent so far; None before chunk 0

    def reset(self) -> None:
        self.pose = None

    def follow(self, poses: ChunkPoses) -> None:
        """Continue from the end of a chunk that was generated (from :meth:`chunk`, or from a
        scripted trajectory)."""
        self.pose = poses.c2w[-1].copy()

    def chunk(self, control: Motion | int | np.ndarray) -> ChunkPoses:
        """The next chunk's poses for ``control`` held for the whole chunk: a :class:`Motion`, an
        official label (0..80) or a relative camera transform ``[4, 4]`` per latent step
        (``c2w_next = c2w @ delta``); the labels are read off the resulting poses. The camera
        moves on only when the chunk is made (:meth:`follow`), so a failed chunk leaves it be."""
        if isinstance(control, np.ndarray):
            step = _check_delta(control)
        else:
            motion = control if isinstance(control, Motion) else Motion.from_label(control)

            def step(T):
                return advance(T, motion)

        first = self.pose is None
        previous = np.eye(4) if first else self.pose
        path = [previous]
        for _ in range(CHUNK_STEPS - 1 if first else CHUNK_STEPS):
            path.append(step(path[-1]))
        c2w = np.stack(path if first else path[1:])
        # Labels compare each latent with the one before it, so the window starts one pose early.
        labels = action_labels(np.linalg.inv(np.stack(path)), third_person=self.third_person)
        return ChunkPoses(c2w=c2w, viewmats=np.linalg.inv(c2w), intrinsics=self._intrinsics.copy(),
                          actions=labels if first else labels[1:])


def _check_delta(delta: np.ndarray):
    """A relative camera transform must be a finite rigid 4x4 (rotation, translation, last row
    0 0 0 1): anything else would feed the model poses no camera can have."""
    d = np.asarray(delta, dtype=np.float64)
    if d.shape != (4, 4) or not np.isfinite(d).all():
        raise PoseError(f"a camera delta must be a finite 4x4 matrix, got shape {d.shape}", token="delta")
    rot = d[:3, :3]
    if (not np.allclose(rot @ rot.T, np.eye(3), atol=1e-6) or np.linalg.det(rot) < 0
            or not np.array_equal(d[3], [0, 0, 0, 1])):
        raise PoseError("a camera delta must be rigid: [[R, t], [0, 0, 0, 1]] with R a rotation", token="delta")
    return lambda T: T @ d
