"""Camera trajectories and discrete action labels, computed exactly as HY-WorldPlay does.

A trajectory is one camera pose per *latent* frame (one latent = 4 video frames). It comes
either from a pose string such as ``"w-31"`` or ``"w-5, right-10"`` or from a JSON file in
the official custom-trajectory format. From the camera-to-world matrices we derive what the
model consumes (see ``hyvideo/generate.py`` ``pose_to_input`` in the official code):

* ``viewmats``: world-to-camera matrices, ``inv(c2w)``;
* ``intrinsics``: pixel intrinsics normalised to ``fx/(2 cx)``, ``fy/(2 cy)``, ``cx = cy = 0.5``;
* ``actions``: one of 81 labels per latent, ``translation_class * 9 + rotation_class``,
  read off the relative motion between consecutive poses (label 0 for the first latent).

Everything is float64 / int64 numpy and follows the official operation order step by step,
so the results are bit-identical to the official functions (``scripts/check_pose_vs_official.py``
verifies this). Camera axes are OpenCV-like: x right, y down, z forward.

Pose-string grammar (stricter than the official parser, which silently drops or truncates
things; every string accepted here means the same as it does officially):

* comma-separated commands ``ACTION-DURATION``; whitespace around commands, actions and
  durations is ignored;
* ACTION is one of ``w s a d up down left right``; DURATION is a positive whole number of
  latent steps written with the digits 0-9;
* rejected with a :class:`PoseError` (the official code accepts them): fractional durations
  (officially truncated, so ``right-0.5`` did nothing), durations such as ``3.0`` or ``1e1``,
  zero durations, empty commands (``"w-3,,d-2"`` or a trailing comma, officially skipped) and
  strings with no command at all; more than :data:`MAX_STEPS` steps in total.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .constants import CHUNK_LATENTS as LATENTS_PER_CHUNK  # the name callers of this module use

__all__ = [
    "ACTIONS",
    "DEFAULT_K",
    "LATENTS_PER_CHUNK",
    "MAX_CHUNKS",
    "MAX_LATENTS",
    "MAX_STEPS",
    "MAX_TRAJECTORY_BYTES",
    "MAX_JSON_DEPTH",
    "RIGID_TOLERANCE",
    "MAX_TRANSLATION",
    "FOCAL_RANGE",
    "MAX_PIXEL_INTRINSIC",
    "PoseCommand",
    "PoseError",
    "Trajectory",
    "action_labels",
    "camera_path",
    "excerpt",
    "load_trajectory",
    "load_trajectory_json",
    "normalize_intrinsics",
    "parse_pose_string",
    "plural",
    "pose_slug",
    "trajectory_from_c2w",
    "trajectory_from_pose_string",
]


class PoseError(ValueError):
    """A pose string, trajectory file or trajectory length is unusable.

    ``token`` is the offending piece of input (a command, a JSON key or field, a file name),
    so callers and tests can point at it; it appears in the message (shortened, with its
    length, when it is long: messages stay one bounded line).
    """

    def __init__(self, message: str, token: str = ""):
        super().__init__(message)
        self.token = token


# Per-step motion of the official parser (`parse_pose_string`): 0.08 units of translation or
# 3 degrees of rotation. Values are built exactly as there (np.deg2rad(3), then negated).
_STEP = 0.08
_TURN = float(np.deg2rad(3))

# action -> (kind, amount) with the official signs. "yaw" rotates about the camera's local y
# (+ turns the view toward +x: right), "pitch" about local x (+ turns it toward -y: up),
# "forward" moves along local z, "right" along local x.
ACTIONS: dict[str, tuple[str, float]] = {
    "w": ("forward", _STEP),
    "s": ("forward", -_STEP),
    "a": ("right", -_STEP),
    "d": ("right", _STEP),
    "up": ("pitch", _TURN),
    "down": ("pitch", -_TURN),
    "left": ("yaw", -_TURN),
    "right": ("yaw", _TURN),
}
_ALLOWED = ", ".join(ACTIONS)

# Pixel intrinsics that the official code attaches to pose strings (1920x1080, fx = 960/0.99).
DEFAULT_K = np.array([[969.6969696969696, 0.0, 960.0], [0.0, 969.6969696969696, 540.0], [0.0, 0.0, 1.0]])

#: Upper bound on the total number of steps of a pose string. The model needs far fewer (60
#: chunks = 239 steps at the default 961 frames); the cap turns a typo such as "w-3000000"
#: into an error instead of minutes of work and gigabytes of memory.
MAX_STEPS = 4096
#: The longest trajectory, in latents. A pose string of MAX_STEPS steps has MAX_STEPS + 1 latents (poses), and
#: a trajectory file may not hold more entries than that either.
MAX_LATENTS = MAX_STEPS + 1
#: The most chunks any trajectory can drive, 1024; a larger num_chunk can never be satisfied.
MAX_CHUNKS = MAX_LATENTS // LATENTS_PER_CHUNK

#: Trajectory files. The longest allowed one (MAX_LATENTS entries) written by json.dump with
#: indent=4 and full-precision floats is 3.7 MB; twice that leaves room for ignored extra fields
#: while a 27 MB file is refused from its size alone, before it is read.
MAX_TRAJECTORY_BYTES = 8 * 2**20
#: The format nests 4 deep (object, entry, matrix, row); the rest is room for ignored fields. A
#: deeper file is refused before anything recurses over it (json.dumps in a message would).
MAX_JSON_DEPTH = 8
#: ``|R^T R - I|`` and ``|last row - [0, 0, 0, 1]|`` per element. Rotations written in float32 or rounded
#: to 4 decimals stay below 2e-4; a scaled (2x, 1e-7x) or sheared matrix is far above. Such a
#: matrix is not a camera pose: PRoPE feeds the full matrices to attention, so it is refused.
RIGID_TOLERANCE = 1e-3
#: Pose strings move 0.08 units per step (at most 328 units in MAX_STEPS steps); 1e6 leaves room
#: for scenes in other units while keeping products of poses far from float overflow.
MAX_TRANSLATION = 1e6
#: Normalised focal length fx / (2 cx) (= focal / image width; the default K gives 0.505). 0.05 to
#: 50 is a horizontal field of view from about 169 down to 1.1 degrees: beyond that a K is a typo
#: (fx = 1e300 ran a whole rollout of garbage) rather than a camera.
FOCAL_RANGE = (0.05, 50.0)
#: Pixel intrinsics (fx, fy, cx, cy) above this are not pixels of any image the model can take.
MAX_PIXEL_INTRINSIC = 1e6

# Label thresholds of the official `pose_to_input`.
_MOVE_EPS = 1e-4  # minimum |translation| to count as a move
_ROT_EPS = 5e-2  # degrees of Euler angle to count as a turn
# 4-bit one-hot -> class 0..8, shared by translation bits (forward, backward, right, left)
# and rotation bits (yaw right, yaw left, pitch up, pitch down).
_ONE_HOT_CLASS = {
    (0, 0, 0, 0): 0,
    (1, 0, 0, 0): 1,
    (0, 1, 0, 0): 2,
    (0, 0, 1, 0): 3,
    (0, 0, 0, 1): 4,
    (1, 0, 1, 0): 5,
    (1, 0, 0, 1): 6,
    (0, 1, 1, 0): 7,
    (0, 1, 0, 1): 8,
}


# --------------------------------------------------------------------------------------------
# Pose strings


class PoseCommand(NamedTuple):
    action: str  # one of ACTIONS
    steps: int  # >= 1 latent steps


def excerpt(s: str, limit: int = 80) -> str:
    """A piece of input for a one-line error message: control characters (line breaks, escape
    sequences) written as escapes, shortened to ``limit`` characters with its length if longer."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in s[:limit])
    if len(s) > limit or len(shown) > limit:
        return f"{shown[: limit - 3]}... ({len(s)} characters)"
    return shown


def plural(count: int, noun: str) -> str:
    """``"1 chunk"``, ``"2 chunks"``: counts in messages read as English."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _need(count: int) -> str:
    return "needs" if count == 1 else "need"


def pose_slug(pose: str) -> str:
    """A file-name-safe form of a pose: ``"w-4, right-13"`` -> ``"w-4_right-13"``.

    Rollout videos are named by it, so two spellings of one pose (``"w-4, right-3"`` and
    ``"w-4,right-3"``) share a slug; configs are checked for that (experiments.schema).
    """
    return re.sub(r"[^A-Za-z0-9.-]+", "_", pose.strip()).strip("_")


def parse_pose_string(pose: str) -> list[PoseCommand]:
    """Parse ``"w-3, right-10"`` into commands, or raise :class:`PoseError` naming the culprit.

    Errors name the pose, the 1-based command index, the command's 0-based character offset
    in the string, the offending command and what is allowed.
    """
    if not isinstance(pose, str):
        raise PoseError(f"pose must be a string, got {type(pose).__name__}", token=repr(pose))
    if not pose.strip():
        raise PoseError(
            f"pose '{excerpt(pose)}' has no commands; write comma-separated ACTION-STEPS commands, "
            f"e.g. 'w-31' or 'w-5,right-10' (actions: {_ALLOWED})",
            token=pose,
        )

    commands: list[PoseCommand] = []
    total = 0
    start = 0  # character offset of the current comma-separated piece
    for index, raw in enumerate(pose.split(","), start=1):
        cmd = raw.strip()
        offset = start + len(raw) - len(raw.lstrip())
        start += len(raw) + 1
        problem = None
        parts = cmd.split("-")
        action, steps_text = (parts[0].strip(), parts[1].strip()) if len(parts) == 2 else ("", "")
        if not cmd:
            problem = "empty command (two commas in a row, or a leading/trailing comma); remove it"
        elif len(parts) != 2:
            problem = (
                "expected ACTION-STEPS with exactly one '-', e.g. 'w-3' "
                "(negative step counts are not allowed: use the opposite action)"
            )
        elif action not in ACTIONS:
            problem = f"unknown action '{excerpt(action, 20)}'; use one of {_ALLOWED}"
        elif not re.fullmatch(r"[0-9]+", steps_text):
            problem = (
                f"step count '{excerpt(steps_text, 20)}' is not a whole number; write a positive integer "
                "number of latent steps (1 step = 4 video frames), e.g. 'w-3'"
            )
        # Compared as text first: int() of a 5000-digit string raises (Python's digit limit).
        elif len(steps_text.lstrip("0")) > len(str(MAX_STEPS)) or total + int(steps_text) > MAX_STEPS:
            problem = f"the pose has more than {MAX_STEPS} steps in total; shorten it"
        elif int(steps_text) == 0:
            problem = "step count must be at least 1; drop the command instead"
        if problem is not None:
            raise PoseError(
                f"pose '{excerpt(pose)}': command {index} '{excerpt(cmd, 40)}' at char {offset}: {problem}",
                token=cmd,
            )
        total += int(steps_text)
        commands.append(PoseCommand(action, int(steps_text)))
    return commands


def _rot_x(theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _rot_y(theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def camera_path(commands: list[PoseCommand]) -> np.ndarray:
    """Integrate commands into camera-to-world matrices ``[steps + 1, 4, 4]`` (identity first).

    Mirrors the official ``generate_camera_trajectory_local`` operation for operation: every
    step moves in the camera's *current* local frame (rotations multiply on the right,
    translations are the local offset rotated into the world). The 4x4 array and the view
    slices are kept as in the original so numpy picks the same kernels and rounds the same.
    """
    T = np.eye(4)
    poses = [T.copy()]
    for action, steps in commands:
        kind, amount = ACTIONS[action]
        for _ in range(steps):
            if kind == "yaw":
                T[:3, :3] = T[:3, :3] @ _rot_y(amount)
            elif kind == "pitch":
                T[:3, :3] = T[:3, :3] @ _rot_x(amount)
            elif kind == "forward":
                T[:3, 3] += T[:3, :3] @ np.array([0, 0, amount])
            else:  # "right"
                T[:3, 3] += T[:3, :3] @ np.array([amount, 0, 0])
            poses.append(T.copy())
    return np.stack(poses)


# --------------------------------------------------------------------------------------------
# Labels and intrinsics (official `pose_to_input`)


def action_labels(viewmats: np.ndarray, *, third_person: bool = False) -> np.ndarray:
    """Action label 0..80 per latent from world-to-camera matrices ``[N, 4, 4]``.

    Like the official code this starts from the viewmats (it re-inverts them, so labels are
    computed from ``inv(inv(c2w))``, not from ``c2w`` itself; the two differ in the last bits).
    Step i compares pose i with pose i-1 in the camera frame of i-1:

    * translation ``m``: if ``|m| > 1e-4``, forward/backward when the angle between ``m`` and
      +z is below 60 / above 120 degrees, right/left likewise against +x (vertical moves have
      no class);
    * rotation: scipy extrinsic ``xyz`` Euler angles in degrees; yaw right/left when the y
      angle is above 0.05 / below -0.05, pitch up/down likewise for the x angle (roll ignored).

    ``third_person`` (the official ``tps=True``, a camera orbiting a character): a step that also
    turns (yaw or pitch beyond 0.05 degrees either way) keeps only its rotation class, since the
    character's own motion is what the translation classes describe; steps without a turn are
    labelled as in first person. Pose strings never move and turn in one step, so for them both
    modes agree; JSON trajectories can differ.

    Returns ``translation * 9 + rotation`` (int64); latent 0 gets 0.
    """
    from scipy.spatial.transform import Rotation  # here, so importing this module stays cheap

    c2ws = np.linalg.inv(viewmats)
    relative = np.linalg.inv(c2ws[:-1]) @ c2ws[1:]
    labels = np.zeros(len(viewmats), dtype=np.int64)
    for i, rel in enumerate(relative, start=1):
        move = rel[:3, 3]
        norm = np.linalg.norm(move)
        rx, ry, _ = Rotation.from_matrix(rel[:3, :3]).as_euler("xyz", degrees=True)
        turns = abs(ry) >= _ROT_EPS or abs(rx) >= _ROT_EPS
        trans = [0, 0, 0, 0]  # forward, backward, right, left
        if norm > _MOVE_EPS and not (third_person and turns):
            angles = np.arccos((move / norm).clip(-1.0, 1.0)) * (180.0 / math.pi)
            if angles[2] < 60:
                trans[0] = 1
            elif angles[2] > 120:
                trans[1] = 1
            if angles[0] < 60:
                trans[2] = 1
            elif angles[0] > 120:
                trans[3] = 1
        rot = [int(ry > _ROT_EPS), int(ry < -_ROT_EPS), int(rx > _ROT_EPS), int(rx < -_ROT_EPS)]
        labels[i] = _ONE_HOT_CLASS[tuple(trans)] * 9 + _ONE_HOT_CLASS[tuple(rot)]
    return labels


def normalize_intrinsics(K: np.ndarray) -> np.ndarray:
    """Pixel intrinsics ``[..., 3, 3]`` -> ``fx/(2 cx)``, ``fy/(2 cy)``, ``cx = cy = 0.5`` (float64).

    This assumes the principal point is the image centre, so ``2 cx`` is the image width. Done
    in the official order (in place on a copy) so the rounding matches.
    """
    out = np.array(K, dtype=np.float64)  # a copy; also turns integer K into float
    out[..., 0, 0] /= out[..., 0, 2] * 2
    out[..., 1, 1] /= out[..., 1, 2] * 2
    out[..., 0, 2] = 0.5
    out[..., 1, 2] = 0.5
    return out


# --------------------------------------------------------------------------------------------
# Trajectory


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a, order="C")  # a private copy, so the caller's array stays writable
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class Trajectory:
    """Per-latent camera data for one rollout, all numpy (read-only arrays).

    ``c2w [N,4,4]`` float64 camera-to-world; ``viewmats [N,4,4]`` float64 world-to-camera
    (``inv(c2w)``); ``intrinsics [N,3,3]`` float64 normalised; ``actions [N]`` int64 in 0..80;
    ``source`` says where it came from. ``N`` is the number of latents (a pose string of S
    steps gives ``S + 1``; video frames = ``1 + 4 (N - 1)``).
    """

    c2w: np.ndarray
    viewmats: np.ndarray
    intrinsics: np.ndarray
    actions: np.ndarray
    source: str

    def __post_init__(self):
        n = len(self.c2w)
        expected = {
            "c2w": ((n, 4, 4), np.float64),
            "viewmats": ((n, 4, 4), np.float64),
            "intrinsics": ((n, 3, 3), np.float64),
            "actions": ((n,), np.int64),
        }
        for name, (shape, dtype) in expected.items():
            value = getattr(self, name)
            if not isinstance(value, np.ndarray) or value.shape != shape or value.dtype != dtype:
                got = f"{value.dtype} {value.shape}" if isinstance(value, np.ndarray) else type(value)
                raise ValueError(f"Trajectory.{name} must be {np.dtype(dtype)} {shape}, got {got}")
            object.__setattr__(self, name, _readonly(value))
        if n == 0:
            raise ValueError("Trajectory needs at least one pose")

    def __len__(self) -> int:
        return len(self.c2w)

    @property
    def num_latents(self) -> int:
        return len(self.c2w)

    def for_chunks(self, num_chunk: int, latents_per_chunk: int = LATENTS_PER_CHUNK) -> Trajectory:
        """The first ``num_chunk * latents_per_chunk`` latents, or a :class:`PoseError`.

        Call this before any model work: the official code crashes mid-rollout on a short
        trajectory and silently ignores the tail of a long one (we do the latter as well).
        Labels are kept as computed on the full trajectory, as the official code slices them.
        """
        if isinstance(num_chunk, bool) or not isinstance(num_chunk, int) or num_chunk < 1:
            raise PoseError(f"num_chunk must be a positive integer, got {num_chunk!r}", token=str(num_chunk))
        need = num_chunk * latents_per_chunk
        have = len(self)
        most_ever = MAX_LATENTS // latents_per_chunk
        if need > MAX_LATENTS:
            # No trajectory can be that long, so suggesting a longer one would be a dead end.
            raise PoseError(
                f"{plural(num_chunk, 'chunk')} {_need(num_chunk)} {plural(need, 'latent')}, more than the {MAX_LATENTS} of the "
                f"longest trajectory ({MAX_STEPS} pose steps); ask for at most {most_ever} chunks",
                token=str(num_chunk),
            )
        if have < need:
            most = have // latents_per_chunk
            fewer = f", or at most {plural(most, 'chunk')} with this trajectory" if most else ""
            raise PoseError(
                f"trajectory {self.source} has {plural(have, 'latent')} but {plural(num_chunk, 'chunk')} "
                f"{_need(num_chunk)} {need} ({latents_per_chunk} per chunk); use a pose string of {need - 1} steps such as "
                f"'w-{need - 1}' (S steps give S+1 latents), a JSON file with entries '0'..'{need - 1}'{fewer}",
                token=self.source,
            )
        if have == need:
            return self
        return Trajectory(
            c2w=self.c2w[:need],
            viewmats=self.viewmats[:need],
            intrinsics=self.intrinsics[:need],
            actions=self.actions[:need],
            source=f"{self.source}[:{need}]",
        )


def trajectory_from_c2w(c2w: np.ndarray, K: np.ndarray, source: str, *, third_person: bool = False) -> Trajectory:
    """Build a :class:`Trajectory` from camera-to-world ``[N,4,4]`` and pixel K ``[N,3,3]``
    (``third_person``: the labels of :func:`~worldplay.pose.action_labels` in that mode)."""
    c2w = np.asarray(c2w, dtype=np.float64)
    viewmats = np.linalg.inv(c2w)
    return Trajectory(
        c2w=c2w,
        viewmats=viewmats,
        intrinsics=normalize_intrinsics(K),
        actions=action_labels(viewmats, third_person=third_person),
        source=source + (" (third person)" if third_person else ""),
    )


def trajectory_from_pose_string(pose: str, *, third_person: bool = False) -> Trajectory:
    """Parse and integrate a pose string (``"w-31"`` -> 32 latents) with the default K."""
    c2w = camera_path(parse_pose_string(pose))
    K = np.broadcast_to(DEFAULT_K, (len(c2w), 3, 3))
    return trajectory_from_c2w(c2w, K, source=f"pose '{excerpt(pose.strip(), 40)}'", third_person=third_person)


# --------------------------------------------------------------------------------------------
# JSON files (official custom-trajectory format)


def _matrix(value, shape: tuple[int, int], where: str) -> np.ndarray:
    """A nested list of JSON numbers of exactly ``shape``, as finite float64, else PoseError."""
    rows, cols = shape
    ok = (
        isinstance(value, list)
        and len(value) == rows
        and all(isinstance(r, list) and len(r) == cols for r in value)
    )
    if not ok:
        raise PoseError(
            f"{where} must be a {rows}x{cols} list of rows (e.g. {np.eye(rows, dtype=int).tolist()}), "
            f"got {excerpt(json.dumps(value), 60)}",
            token=where,
        )
    for r in value:
        for x in r:
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                raise PoseError(f"{where} must hold numbers, found {excerpt(json.dumps(x), 40)}", token=where)
    try:
        out = np.array(value, dtype=np.float64)
    except OverflowError:  # an integer literal beyond float64 (e.g. 400 digits)
        out = np.full(shape, np.inf)
    if not np.isfinite(out).all():
        raise PoseError(f"{where} has non-finite values (NaN, Infinity or beyond float64); write finite numbers",
                        token=where)
    return out


def _read_json(name: str):
    """The parsed JSON of a trajectory file, with its size and nesting bounded, else PoseError.

    The size is checked before reading (and the read is capped, for files that grow or lie about
    their size), so a huge file costs nothing; deep nesting is refused without a RecursionError.
    """
    try:
        info = os.stat(name)
        if not stat.S_ISREG(info.st_mode):
            raise PoseError(f"trajectory file {name} is not a regular file; pass a .json file", token=name)
        if info.st_size > MAX_TRAJECTORY_BYTES:
            raise PoseError(_too_big(name, info.st_size), token=name)
        with open(name, "rb") as f:
            raw = f.read(MAX_TRAJECTORY_BYTES + 1)
    except OSError as e:
        raise PoseError(f"cannot read trajectory file {name}: {e.strerror or e}", token=name) from None
    if len(raw) > MAX_TRAJECTORY_BYTES:
        raise PoseError(_too_big(name, len(raw)), token=name)
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise PoseError(f"trajectory file {name} is not UTF-8 text: {e}", token=name) from None
    except json.JSONDecodeError as e:
        raise PoseError(
            f"trajectory file {name} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
            token=name,
        ) from None
    except RecursionError:
        raise PoseError(_too_deep(name), token=name) from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits (Python's int_max_str_digits)
        raise PoseError(f"trajectory file {name} is not usable JSON: {e}", token=name) from None


def _too_big(name: str, size: int) -> str:
    return (f"trajectory file {name} is {size / 2**20:.1f} MiB, more than the {MAX_TRAJECTORY_BYTES // 2**20} MiB "
            f"a trajectory of at most {MAX_LATENTS} entries needs; check that it is the right file")


def _too_deep(name: str) -> str:
    return (f"trajectory file {name} nests more than {MAX_JSON_DEPTH} levels deep; the format is an object of "
            '{"extrinsic": 4x4, "K": 3x3} entries (4 levels)')


def _nests_deeper_than(value, limit: int) -> bool:
    """Whether ``value`` has containers more than ``limit`` deep (a loop, not recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


# The parts of K that the model does not use must hold their canonical 0 / 1: a skew or a
# projective row would otherwise be dropped without a word (normalize_intrinsics reads fx, fy,
# cx, cy only). Files written from a K matrix hold these values exactly.
_K_LAYOUT_TOLERANCE = 1e-6


def _camera_problem(c2w: np.ndarray, K: np.ndarray) -> tuple[str, str] | None:
    """(field, problem) for the first thing wrong with one entry's camera, or None."""
    R = c2w[:3, :3]
    off_rigid = np.abs(R.T @ R - np.eye(3)).max()
    if off_rigid > RIGID_TOLERANCE:
        return "extrinsic", (
            f"has a rotation part that is scaled or sheared (max |R^T R - I| = {off_rigid:.3g}, more than "
            f"{RIGID_TOLERANCE:g}); the upper-left 3x3 of a camera-to-world matrix must be a rotation"
        )
    det = float(np.linalg.det(R))
    if det < 0:
        return "extrinsic", (
            f"has a rotation part with determinant {det:.3g}: a reflection (left-handed camera frame), "
            "not a rotation; use a right-handed frame (x right, y down, z forward; determinant +1)"
        )
    last = np.abs(c2w[3] - (0.0, 0.0, 0.0, 1.0)).max()
    if last > RIGID_TOLERANCE:
        return "extrinsic", (
            f"has last row {c2w[3].tolist()}; a camera-to-world matrix [[R, t], [0, 0, 0, 1]] ends in "
            f"[0, 0, 0, 1] (within {RIGID_TOLERANCE:g})"
        )
    if np.abs(c2w[:3, 3]).max() > MAX_TRANSLATION:
        return "extrinsic", (
            f"has translation {c2w[:3, 3].tolist()}, beyond {MAX_TRANSLATION:g} units; check its units "
            "(a pose-string step moves 0.08)"
        )
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    layout = (
        "write pixel intrinsics [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] with the principal point at the image centre"
    )
    if min(fx, fy, cx, cy) <= 0:
        return "K", f"must have positive fx, fy, cx, cy (got fx={fx}, fy={fy}, cx={cx}, cy={cy}); {layout}"
    if max(fx, fy, cx, cy) > MAX_PIXEL_INTRINSIC:
        return "K", (
            f"has fx={fx:g}, fy={fy:g}, cx={cx:g}, cy={cy:g}: pixel values above {MAX_PIXEL_INTRINSIC:g} "
            f"belong to no real image; {layout}"
        )
    low, high = FOCAL_RANGE
    for axis, focal, centre in (("x", fx, cx), ("y", fy, cy)):
        normalised = focal / (2 * centre)
        if not low <= normalised <= high:
            return "K", (
                f"has f{axis} / (2 c{axis}) = {normalised:.3g}, outside [{low:g}, {high:g}] (a field of view "
                f"between about 169 and 1.1 degrees; the default K gives 0.505); check f{axis} and c{axis}"
            )
    fixed = np.abs(K - np.diag([fx, fy, 1.0]) - [[0, 0, cx], [0, 0, cy], [0, 0, 0]]).max()
    if fixed > _K_LAYOUT_TOLERANCE:
        return "K", f"has a skew or a non-canonical last row ({K.tolist()}); {layout}"
    return None


def load_trajectory_json(path: str | os.PathLike, *, third_person: bool = False) -> Trajectory:
    """Load the official custom-trajectory JSON format and validate it.

    The file is an object keyed ``"0"``, ``"1"``, ...; each entry has ``"extrinsic"`` (4x4
    camera-to-world) and ``"K"`` (3x3 pixel intrinsics); other fields are ignored. Entries are
    taken in index order (the official code takes them in file order, which is the same for
    files written by its own writer).

    Everything is checked here, before any model work: size (:data:`MAX_TRAJECTORY_BYTES`),
    nesting, entry count (at most :data:`MAX_LATENTS`, like a pose string of
    :data:`MAX_STEPS` steps), that each extrinsic is rigid (an orthonormal rotation with
    determinant +1 and last row ``[0, 0, 0, 1]``, within :data:`RIGID_TOLERANCE`) with a
    translation within :data:`MAX_TRANSLATION`, and that each K is a pinhole matrix with finite
    positive intrinsics of sane size (:data:`FOCAL_RANGE`, :data:`MAX_PIXEL_INTRINSIC`).
    """
    name = os.fspath(path)
    data = _read_json(name)
    if not isinstance(data, dict) or not data:
        raise PoseError(
            f'trajectory file {name} must hold a non-empty JSON object keyed "0", "1", ... '
            'with {"extrinsic": 4x4, "K": 3x3} entries',
            token=name,
        )
    n = len(data)
    if n > MAX_LATENTS:
        raise PoseError(
            f"trajectory file {name} has {n} entries, more than the {MAX_LATENTS} latents of the longest "
            f"trajectory ({MAX_STEPS} pose steps, {MAX_CHUNKS} chunks); keep the first {MAX_LATENTS} at most",
            token=name,
        )
    if _nests_deeper_than(data, MAX_JSON_DEPTH):
        raise PoseError(_too_deep(name), token=name)
    for i in range(n):
        if str(i) not in data:
            # ASCII digits only ("²".isdigit() is true), compared as text before int() (digit limit)
            bad = sorted(k for k in data if not (re.fullmatch(r"0|[1-9][0-9]*", k)
                                                 and len(k) <= len(str(n)) and int(k) < n))
            extra = f" (unexpected keys: {', '.join(repr(excerpt(k, 20)) for k in bad[:5])})" if bad else ""
            raise PoseError(
                f'trajectory file {name}: entry "{i}" is missing{extra}; keys must be '
                f'"0".."{n - 1}" without gaps, one per latent',
                token=str(i),
            )

    c2w = np.empty((n, 4, 4))
    K = np.empty((n, 3, 3))
    for i in range(n):
        key = str(i)
        entry = data[key]
        for field in ("extrinsic", "K"):
            if not isinstance(entry, dict) or field not in entry:
                raise PoseError(
                    f'trajectory file {name}: entry "{key}" has no "{field}"; each entry needs '
                    '"extrinsic" (4x4 camera-to-world) and "K" (3x3 pixel intrinsics)',
                    token=f'"{key}".{field}',
                )
        where = f'trajectory file {name}: entry "{key}" field '
        c2w[i] = _matrix(entry["extrinsic"], (4, 4), where + "extrinsic")
        K[i] = _matrix(entry["K"], (3, 3), where + "K")
        problem = _camera_problem(c2w[i], K[i])
        if problem is not None:
            field, text = problem
            raise PoseError(f"{where}{field} {text}", token=f'"{key}".{field}')
    return trajectory_from_c2w(c2w, K, source=f"file {name}", third_person=third_person)


def load_trajectory(spec: str | os.PathLike, *, third_person: bool = False) -> Trajectory:
    """A pose string, or a path to a ``.json`` trajectory file (like the official ``--pose``);
    ``third_person`` labels actions as the official ``tps=True`` does (:func:`~worldplay.pose.action_labels`)."""
    if isinstance(spec, os.PathLike) or (isinstance(spec, str) and spec.strip().lower().endswith(".json")):
        path = os.fspath(spec).strip() if isinstance(spec, str) else spec
        return load_trajectory_json(path, third_person=third_person)
    return trajectory_from_pose_string(spec, third_person=third_person)
