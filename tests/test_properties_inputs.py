"""Property tests of the input boundaries: pose strings, trajectory files, experiment configs and
the input manifest.

Whatever the input, the outcome is a valid object or the boundary's own error type with a
one-line, bounded message; never another exception (a traceback for the user). Valid inputs
are generated too, so that the checks cannot pass by refusing everything.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worldplay.experiments.inputs import InputError, InputManifest
from worldplay.experiments.schema import (
    WEIGHTS_KEYS,
    ExperimentConfigError,
    allowed_keys,
    load_config,
)
from worldplay.pose import (
    ACTIONS,
    MAX_STEPS,
    PoseCommand,
    PoseError,
    load_trajectory_json,
    parse_pose_string,
    trajectory_from_pose_string,
)

REPO_EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
# Longest message any of these boundaries may print: the file name plus a sentence or two.
MESSAGE_LIMIT = 700
FAST = settings(max_examples=80, deadline=None)


def one_bounded_line(exc: Exception) -> None:
    message = str(exc)
    assert message and len(message.splitlines()) == 1, message
    assert len(message) <= MESSAGE_LIMIT, f"{len(message)} characters: {message[:200]}..."


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("properties")


# --------------------------------------------------------------------------------------------
# pose strings
# --------------------------------------------------------------------------------------------

blank = st.text(alphabet=" \t", max_size=2)


@st.composite
def spelled_poses(draw, max_total: int = MAX_STEPS):
    """(pose string, its commands): any spelling the grammar accepts, total steps capped."""
    budget = max_total
    commands = []
    for _ in range(draw(st.integers(1, 8))):
        if budget < 1:
            break
        steps = draw(st.integers(1, budget))
        budget -= steps
        commands.append(PoseCommand(draw(st.sampled_from(sorted(ACTIONS))), steps))
    pieces = []
    for action, steps in commands:
        zeros = "0" * draw(st.integers(0, 3))
        pieces.append(f"{draw(blank)}{action}{draw(blank)}-{draw(blank)}{zeros}{steps}{draw(blank)}")
    return ",".join(pieces), commands


@FAST
@given(spelled_poses())
def test_valid_pose_strings_parse_to_their_steps(spelled):
    pose, commands = spelled
    assert parse_pose_string(pose) == commands
    canonical = ",".join(f"{a}-{n}" for a, n in commands)
    assert parse_pose_string(canonical) == commands  # round trip through the plain spelling


@settings(max_examples=30, deadline=None)
@given(spelled_poses(max_total=40))
def test_valid_pose_strings_give_one_latent_per_step_plus_one(spelled):
    pose, commands = spelled
    trajectory = trajectory_from_pose_string(pose)
    assert len(trajectory) == sum(n for _, n in commands) + 1
    assert 0 <= trajectory.actions.min() and trajectory.actions.max() <= 80


near_grammar = st.text(alphabet="wsadupdownleftrigh-,0123456789. \t\n\r\x1b\x00é", max_size=60)
long_numbers = st.builds(lambda action, digits: f"{action}-{digits}", st.sampled_from(sorted(ACTIONS)),
                         st.text(alphabet="0123456789", min_size=1, max_size=6000))
long_noise = st.builds(lambda ch, n: ch * n, st.sampled_from(["x", "w-1,", ",", " ", "\n", "-"]),
                       st.integers(1, 30_000))


@settings(max_examples=150, deadline=None)
@given(st.one_of(near_grammar, st.text(max_size=40), long_numbers, long_noise))
def test_any_text_parses_or_raises_a_one_line_pose_error(text):
    try:
        commands = parse_pose_string(text)
    except PoseError as exc:
        one_bounded_line(exc)
    else:
        assert 1 <= sum(n for _, n in commands) <= MAX_STEPS


# --------------------------------------------------------------------------------------------
# trajectory files
# --------------------------------------------------------------------------------------------


def _rotation(q) -> np.ndarray:
    w, x, y, z = np.asarray(q) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


quaternions = st.lists(st.floats(-1, 1), min_size=4, max_size=4).filter(lambda q: np.linalg.norm(q) > 0.1)
poses = st.builds(lambda q, t: np.block([[_rotation(q), np.array(t)[:, None]], [np.zeros((1, 3)), np.ones((1, 1))]]),
                  quaternions, st.lists(st.floats(-1000, 1000), min_size=3, max_size=3))
# fx / (2 cx) from 0.1 to 10: well inside the accepted field of view
intrinsics = st.builds(lambda cx, cy, nx, ny: np.array([[nx * 2 * cx, 0, cx], [0, ny * 2 * cy, cy], [0, 0, 1.0]]),
                       st.floats(1, 4096), st.floats(1, 4096), st.floats(0.1, 10), st.floats(0.1, 10))
trajectories = st.lists(st.tuples(poses, intrinsics), min_size=1, max_size=8)


def _entries(cameras) -> dict:
    return {str(i): {"extrinsic": c2w.tolist(), "K": K.tolist()} for i, (c2w, K) in enumerate(cameras)}


def _write(scratch: Path, content) -> Path:
    path = scratch / "trajectory.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


@FAST
@given(trajectories)
def test_valid_trajectory_files_load(scratch, cameras):
    t = load_trajectory_json(_write(scratch, _entries(cameras)))
    assert np.array_equal(t.c2w, np.stack([c for c, _ in cameras]))
    K = np.stack([k for _, k in cameras])
    assert np.allclose(t.intrinsics[:, 0, 0], K[:, 0, 0] / (2 * K[:, 0, 2]))
    assert len(t) == len(cameras) and 0 <= t.actions.min() and t.actions.max() <= 80


def _scale(c2w, K, f):
    c2w[:3, :3] *= f


def _shear(c2w, K, amount, i, j):
    c2w[i, j] += amount if i != j else 0  # i == j is a scale: amount is large enough either way
    c2w[i, i] += amount if i == j else 0


def _reflect(c2w, K, column):
    c2w[:3, column] *= -1


def _last_row(c2w, K, j, delta):
    c2w[3, j] += delta


def _far(c2w, K, j, value):
    c2w[j, 3] = value


def _non_finite(c2w, K, which, i, j, value):
    (c2w if which == "extrinsic" else K)[i % (4 if which == "extrinsic" else 3), j % (4 if which == "extrinsic" else 3)] \
        = value


def _focal(c2w, K, axis, normalised):
    K[axis, axis] = normalised * 2 * K[axis, 2]


def _centre(c2w, K, axis, value):
    K[axis, 2] = value


def _canonical_entry(c2w, K, ij, value):
    K[ij] = value  # a skew or a projective last row, where a pinhole K has 0


# Every one of these makes an entry invalid whatever its parameters (the margins keep clear of
# the tolerances): the loader must refuse it with a PoseError.
geometric_damage = st.one_of(
    st.tuples(st.just(_scale), st.one_of(st.floats(1.01, 1e6), st.floats(1e-9, 0.99))),
    st.tuples(st.just(_shear), st.one_of(st.floats(0.05, 10), st.floats(-10, -0.05)), st.integers(0, 2),
              st.integers(0, 2)),
    st.tuples(st.just(_reflect), st.integers(0, 2)),
    st.tuples(st.just(_last_row), st.integers(0, 3), st.one_of(st.floats(0.01, 1e6), st.floats(-1e6, -0.01))),
    st.tuples(st.just(_far), st.integers(0, 2), st.one_of(st.floats(1.1e6, 1e300), st.floats(-1e300, -1.1e6))),
    st.tuples(st.just(_non_finite), st.sampled_from(["extrinsic", "K"]), st.integers(0, 3), st.integers(0, 3),
              st.sampled_from([math.nan, math.inf, -math.inf])),
    st.tuples(st.just(_focal), st.integers(0, 1),
              st.one_of(st.floats(-1e6, 0), st.floats(1e-9, 0.049), st.floats(50.5, 1e6))),
    st.tuples(st.just(_centre), st.integers(0, 1), st.one_of(st.floats(-1e6, 0), st.floats(1.1e6, 1e300))),
    st.tuples(st.just(_canonical_entry), st.sampled_from([(0, 1), (1, 0), (2, 0), (2, 1)]),
              st.one_of(st.floats(0.01, 1e6), st.floats(-1e6, -0.01))),
)


@FAST
@given(trajectories, st.data(), geometric_damage)
def test_damaged_cameras_are_refused_with_a_pose_error(scratch, cameras, data, damage):
    index = data.draw(st.integers(0, len(cameras) - 1))
    c2w, K = (a.copy() for a in cameras[index])
    damage[0](c2w, K, *damage[1:])
    cameras = [*cameras[:index], (c2w, K), *cameras[index + 1:]]
    with pytest.raises(PoseError) as info:
        load_trajectory_json(_write(scratch, _entries(cameras)))
    one_bounded_line(info.value)
    assert f'entry "{index}"' in str(info.value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.floats(allow_nan=True) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=5), children, max_size=5),
    max_leaves=30,
)


def _set_path(entries, keys, value):
    node = entries
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value


@FAST
@given(trajectories, st.data(), json_values)
def test_any_value_in_any_place_loads_or_raises_a_pose_error(scratch, cameras, data, value):
    entries = _entries(cameras)
    index = str(data.draw(st.integers(0, len(cameras) - 1)))
    where = data.draw(st.sampled_from([
        [index], [index, "extrinsic"], [index, "K"], [index, "extrinsic", data.draw(st.integers(0, 3))],
        [index, "K", data.draw(st.integers(0, 2)), data.draw(st.integers(0, 2))],
        [index, "extrinsic", data.draw(st.integers(0, 3)), data.draw(st.integers(0, 3))],
        [str(len(cameras) + data.draw(st.integers(0, 3)))], [data.draw(st.text(max_size=4))],
    ]))
    _set_path(entries, where, value)
    try:
        load_trajectory_json(_write(scratch, entries))
    except PoseError as exc:
        one_bounded_line(exc)


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.binary(max_size=200), json_values.map(json.dumps),
                 st.integers(1, 50_000).map(lambda n: "[" * n + "]" * n),
                 st.integers(1, 50_000).map(lambda n: '{"0": ' * n + "1" + "}" * n),
                 st.integers(1, 5000).map(lambda n: '{"0": {"extrinsic": 1' + "0" * n + ', "K": 1}}')))
def test_any_file_loads_or_raises_a_pose_error(scratch, content):
    try:
        load_trajectory_json(_write(scratch, content))
    except PoseError as exc:
        one_bounded_line(exc)


# --------------------------------------------------------------------------------------------
# experiment configs and the input manifest (TOML)
# --------------------------------------------------------------------------------------------


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\' or ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else "inf" if value == math.inf else "-inf" if value == -math.inf \
            else repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def to_toml(document: dict) -> str:
    """A TOML document, one ``key = value`` line per key (tables inline)."""
    return "".join(f"{_toml_key(k)} = {_toml_value(v)}\n" for k, v in document.items())


POSE_WORDS = ["w-31", "w-4095", "w-4096", "w-3,right-28", "w-31, right-3", "w-31,right-3", "input:traj-1",
              "input:img-1", "w-0", "w-" + "9" * 50, "", " ", "jump-3", "w-31,", "w-1e3"]
toml_scalars = (
    st.booleans()
    | st.integers(-3, 5000) | st.integers(-2**70, 2**70) | st.sampled_from([0, 1, 2**63 - 1, 2**63, 2**64, 10**23])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20) | st.sampled_from(POSE_WORDS)
    | st.sampled_from(["bench", "rollouts", "drift", "parity", "tiny", "wan5b", "cpu", "cuda", "sdpa", "native-eager",
                       "native-float32", "official", "synthetic", "img-1", "repeat"])
    | st.dates() | st.datetimes()
)
toml_values = st.recursive(
    toml_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=12,
)

BASES = {name: tomllib.loads((REPO_EXPERIMENTS / f"{name}.toml").read_text(encoding="utf-8"))
         for name in ("bench-tiny-cpu", "rollouts-tiny-cpu", "drift-tiny-cpu", "parity-official", "bench")}
INPUT_IDS = {"img-1": "image", "img-5": "image", "captions": "captions", "traj-1": "pose"}


@st.composite
def edited_configs(draw):
    """(file name, TOML text): a pinned config with some keys given random values or dropped."""
    name = draw(st.sampled_from(sorted(BASES)))
    document = json.loads(json.dumps(BASES[name]))  # a deep copy
    keys = sorted({*allowed_keys(document["kind"]), "unknown-key", "weights"})
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(keys))
        action = draw(st.sampled_from(["set", "set", "drop", "weights"]))
        if action == "drop":
            document.pop(key, None)
        elif action == "weights":
            weights = document.setdefault("weights", {})
            if isinstance(weights, dict):
                weights[draw(st.sampled_from([*WEIGHTS_KEYS, "seed"]))] = draw(toml_values)
        else:
            document[key] = draw(toml_values)
    return name, to_toml(document)


@FAST
@given(edited_configs(), st.booleans())
def test_any_config_value_is_a_config_or_a_config_error(scratch, named, with_ids):
    name, text = named
    path = scratch / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    try:
        config = load_config(path, input_ids=INPUT_IDS if with_ids else None)
    except ExperimentConfigError as exc:
        one_bounded_line(exc)
    else:
        assert len(config.config_hash) == 64  # a valid config is hashable: JSON-clean, finite
        # and the run can take its values: the seeds fit torch's generator, the chunks a trajectory
        import torch

        torch.Generator().manual_seed(config.seed)
        if config.weights.random_init is not None:
            torch.Generator().manual_seed(config.weights.random_init)
        assert config.num_chunk * 4 <= min(config.noise_latents, MAX_STEPS + 1)


@settings(max_examples=60, deadline=None)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200),
                 st.integers(1, 6000).map(lambda n: "seed = " + "9" * n),
                 st.integers(1, 50_000).map(lambda n: "a = " + "[" * n + "]" * n),
                 st.integers(1, 5000).map(lambda n: "a = " + "{b = " * n + "1" + "}" * n)))
def test_any_config_text_is_a_config_or_a_config_error(scratch, text):
    path = scratch / "fuzz-tiny-cpu.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except ExperimentConfigError as exc:
        one_bounded_line(exc)


def test_the_config_generator_also_makes_valid_configs(scratch):
    """Guard for the two properties above: unchanged bases load, so they are not refusal-only."""
    for name, document in BASES.items():
        path = scratch / f"{name}.toml"
        path.write_text(to_toml(document), encoding="utf-8")
        assert load_config(path, input_ids=INPUT_IDS).name == name


MANIFEST_ENTRY = {"kind": "image", "url": "https://example.com/assets/1.png", "sha256": "0" * 64}


@st.composite
def edited_manifests(draw):
    document = {"source": {"repository": "https://example.com"},
                "inputs": {"img-1": dict(MANIFEST_ENTRY), "traj-1": {**MANIFEST_ENTRY, "kind": "pose",
                                                                     "url": "https://example.com/t.json"}}}
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from(["entry", "entry", "id", "top"]))
        inputs = document.get("inputs")
        if target == "entry" and isinstance(inputs, dict) and isinstance(inputs.get("img-1"), dict):
            inputs["img-1"][draw(st.sampled_from(["kind", "url", "sha256", "extra"]))] = draw(toml_values)
        elif target == "id" and isinstance(inputs, dict):
            inputs[draw(st.text(max_size=8))] = draw(st.one_of(toml_values, st.just(dict(MANIFEST_ENTRY))))
        else:
            document[draw(st.sampled_from(["source", "inputs", "other"]))] = draw(toml_values)
    return document


@FAST
@given(edited_manifests())
def test_any_manifest_value_is_a_manifest_or_an_input_error(scratch, document):
    path = scratch / "inputs.toml"
    path.write_text(to_toml(document), encoding="utf-8")
    try:
        manifest = InputManifest.load(path)
    except InputError as exc:
        one_bounded_line(exc)
    else:
        for ident, entry in manifest.entries.items():
            assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", ident) and entry.url.startswith("https://")


def test_the_manifest_generator_also_makes_valid_manifests(scratch):
    path = scratch / "inputs.toml"
    path.write_text(to_toml({"inputs": {"img-1": MANIFEST_ENTRY}}), encoding="utf-8")
    assert InputManifest.load(path).kinds() == {"img-1": "image"}
