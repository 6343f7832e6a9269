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
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy.spatial.transform import Rotation

__all__ = [
    "ACTIONS",
    "DEFAULT_K",
    "MAX_STEPS",
    "PoseCommand",
    "PoseError",
    "Trajectory",
    "action_labels",
    "camera_path",
    "load_trajectory",
    "load_trajectory_json",
    "normalize_intrinsics",
    "parse_pose_string",
    "trajectory_from_c2w",
    "trajectory_from_pose_string",
]


class PoseError(ValueError):
    """A pose string, trajectory file or trajectory length is unusable.

    ``token`` is the offending piece of input (a command, a JSON key or field, a file name),
    so callers and tests can point at it; it always appears in the message.
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


def _show(s: str, limit: int = 80) -> str:
    """The pose string for an error message, shortened if it is long."""
    return s if len(s) <= limit else s[: limit - 3] + "..."


def parse_pose_string(pose: str) -> list[PoseCommand]:
    """Parse ``"w-3, right-10"`` into commands, or raise :class:`PoseError` naming the culprit.

    Errors name the pose, the 1-based command index, the command's 0-based character offset
    in the string, the offending command and what is allowed.
    """
    if not isinstance(pose, str):
        raise PoseError(f"pose must be a string, got {type(pose).__name__}", token=repr(pose))
    if not pose.strip():
        raise PoseError(
            f"pose '{pose}' has no commands; write comma-separated ACTION-STEPS commands, "
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
            problem = f"unknown action '{action}'; use one of {_ALLOWED}"
        elif not re.fullmatch(r"[0-9]+", steps_text):
            problem = (
                f"step count '{steps_text}' is not a whole number; write a positive integer "
                "number of latent steps (1 step = 4 video frames), e.g. 'w-3'"
            )
        elif int(steps_text) == 0:
            problem = "step count must be at least 1; drop the command instead"
        elif total + int(steps_text) > MAX_STEPS:
            problem = f"the pose has more than {MAX_STEPS} steps in total; shorten it"
        if problem is not None:
            raise PoseError(
                f"pose '{_show(pose)}': command {index} '{cmd}' at char {offset}: {problem}", token=cmd
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


def action_labels(viewmats: np.ndarray) -> np.ndarray:
    """Action label 0..80 per latent from world-to-camera matrices ``[N, 4, 4]``.

    Like the official code this starts from the viewmats (it re-inverts them, so labels are
    computed from ``inv(inv(c2w))``, not from ``c2w`` itself; the two differ in the last bits).
    Step i compares pose i with pose i-1 in the camera frame of i-1:

    * translation ``m``: if ``|m| > 1e-4``, forward/backward when the angle between ``m`` and
      +z is below 60 / above 120 degrees, right/left likewise against +x (vertical moves have
      no class);
    * rotation: scipy extrinsic ``xyz`` Euler angles in degrees; yaw right/left when the y
      angle is above 0.05 / below -0.05, pitch up/down likewise for the x angle (roll ignored).

    Returns ``translation * 9 + rotation`` (int64); latent 0 gets 0. The third-person (``tps``)
    variant of the official function is not needed by the WAN model and is not implemented.
    """
    c2ws = np.linalg.inv(viewmats)
    relative = np.linalg.inv(c2ws[:-1]) @ c2ws[1:]
    labels = np.zeros(len(viewmats), dtype=np.int64)
    for i, rel in enumerate(relative, start=1):
        move = rel[:3, 3]
        norm = np.linalg.norm(move)
        trans = [0, 0, 0, 0]  # forward, backward, right, left
        if norm > _MOVE_EPS:
            angles = np.arccos((move / norm).clip(-1.0, 1.0)) * (180.0 / math.pi)
            if angles[2] < 60:
                trans[0] = 1
            elif angles[2] > 120:
                trans[1] = 1
            if angles[0] < 60:
                trans[2] = 1
            elif angles[0] > 120:
                trans[3] = 1
        rx, ry, _ = Rotation.from_matrix(rel[:3, :3]).as_euler("xyz", degrees=True)
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

    def for_chunks(self, num_chunk: int, latents_per_chunk: int = 4) -> Trajectory:
        """The first ``num_chunk * latents_per_chunk`` latents, or a :class:`PoseError`.

        Call this before any model work: the official code crashes mid-rollout on a short
        trajectory and silently ignores the tail of a long one (we do the latter as well).
        Labels are kept as computed on the full trajectory, as the official code slices them.
        """
        if isinstance(num_chunk, bool) or not isinstance(num_chunk, int) or num_chunk < 1:
            raise PoseError(f"num_chunk must be a positive integer, got {num_chunk!r}", token=str(num_chunk))
        need = num_chunk * latents_per_chunk
        have = len(self)
        if have < need:
            most = have // latents_per_chunk
            fewer = f", or at most {most} chunks with this trajectory" if most else ""
            raise PoseError(
                f"trajectory {self.source} has {have} latents but {num_chunk} chunks need {need} "
                f"({latents_per_chunk} per chunk); use --pose w-{need - 1} for {num_chunk} chunks "
                f"(a pose string of S steps gives S+1 latents), a JSON file with entries "
                f"'0'..'{need - 1}'{fewer}",
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


def trajectory_from_c2w(c2w: np.ndarray, K: np.ndarray, source: str) -> Trajectory:
    """Build a :class:`Trajectory` from camera-to-world ``[N,4,4]`` and pixel K ``[N,3,3]``."""
    c2w = np.asarray(c2w, dtype=np.float64)
    viewmats = np.linalg.inv(c2w)
    return Trajectory(
        c2w=c2w,
        viewmats=viewmats,
        intrinsics=normalize_intrinsics(K),
        actions=action_labels(viewmats),
        source=source,
    )


def trajectory_from_pose_string(pose: str) -> Trajectory:
    """Parse and integrate a pose string (``"w-31"`` -> 32 latents) with the default K."""
    c2w = camera_path(parse_pose_string(pose))
    K = np.broadcast_to(DEFAULT_K, (len(c2w), 3, 3))
    return trajectory_from_c2w(c2w, K, source=f"pose '{_show(pose.strip(), 40)}'")


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
            f"got {json.dumps(value)[:80]}",
            token=where,
        )
    for r in value:
        for x in r:
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                raise PoseError(f"{where} must hold numbers, found {json.dumps(x)}", token=where)
    out = np.array(value, dtype=np.float64)
    if not np.isfinite(out).all():
        raise PoseError(f"{where} has non-finite values (NaN or Infinity); write finite numbers", token=where)
    return out


def load_trajectory_json(path: str | os.PathLike) -> Trajectory:
    """Load the official custom-trajectory JSON format and validate it.

    The file is an object keyed ``"0"``, ``"1"``, ...; each entry has ``"extrinsic"`` (4x4
    camera-to-world) and ``"K"`` (3x3 pixel intrinsics); other fields are ignored. Entries are
    taken in index order (the official code takes them in file order, which is the same for
    files written by its own writer).
    """
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise PoseError(f"cannot read trajectory file {name}: {e.strerror or e}", token=name) from e
    except UnicodeDecodeError as e:
        raise PoseError(f"trajectory file {name} is not UTF-8 text: {e}", token=name) from e
    except json.JSONDecodeError as e:
        raise PoseError(
            f"trajectory file {name} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
            token=name,
        ) from e

    if not isinstance(data, dict) or not data:
        raise PoseError(
            f'trajectory file {name} must hold a non-empty JSON object keyed "0", "1", ... '
            'with {"extrinsic": 4x4, "K": 3x3} entries',
            token=name,
        )
    n = len(data)
    for i in range(n):
        if str(i) not in data:
            bad = sorted(k for k in data if not (k.isdigit() and k == str(int(k)) and int(k) < n))
            extra = f" (unexpected keys: {', '.join(repr(k) for k in bad[:5])})" if bad else ""
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
        # Invertibility: viewmats are inv(extrinsic). A rigid c2w has condition number ~|t|.
        if np.linalg.cond(c2w[i]) > 1e12:
            raise PoseError(
                f"{where}extrinsic is singular (not invertible); it must be a camera-to-world "
                "matrix [[R, t], [0, 0, 0, 1]] with a rotation R",
                token=f'"{key}".extrinsic',
            )
        fx, fy, cx, cy = K[i, 0, 0], K[i, 1, 1], K[i, 0, 2], K[i, 1, 2]
        if min(fx, fy, cx, cy) <= 0:
            raise PoseError(
                f"{where}K must have positive fx, fy, cx, cy (got fx={fx}, fy={fy}, cx={cx}, "
                f"cy={cy}); write pixel intrinsics [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] with "
                "the principal point at the image centre",
                token=f'"{key}".K',
            )
    return trajectory_from_c2w(c2w, K, source=f"file {name}")


def load_trajectory(spec: str | os.PathLike) -> Trajectory:
    """A pose string, or a path to a ``.json`` trajectory file (like the official ``--pose``)."""
    if isinstance(spec, os.PathLike) or (isinstance(spec, str) and spec.strip().lower().endswith(".json")):
        path = os.fspath(spec).strip() if isinstance(spec, str) else spec
        return load_trajectory_json(path)
    return trajectory_from_pose_string(spec)
