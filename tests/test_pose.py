"""Pose strings, trajectories, action labels and the JSON trajectory format (worldplay.pose)."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worldplay.pose import (
    ACTIONS,
    DEFAULT_K,
    MAX_STEPS,
    PoseCommand,
    PoseError,
    Trajectory,
    load_trajectory,
    load_trajectory_json,
    parse_pose_string,
    trajectory_from_pose_string,
)

# Label of one step of each action: translation class * 9 + rotation class (spec 2.1).
STEP_LABEL = {"w": 9, "s": 18, "d": 27, "a": 36, "right": 1, "left": 2, "up": 3, "down": 4}


def write_json(path, c2w, K=DEFAULT_K):
    """A trajectory file in the official custom-trajectory format (generate_custom_trajectory.py)."""
    entries = {
        str(i): {"extrinsic": np.asarray(m).tolist(), "K": np.asarray(K).tolist()} for i, m in enumerate(c2w)
    }
    path.write_text(json.dumps(entries, indent=4))
    return path


# ------------------------------------------------------------------------------------------
# Known values


@pytest.mark.parametrize(
    "pose, actions",
    [
        ("w-3", [0, 9, 9, 9]),
        ("right-3", [0, 1, 1, 1]),
        ("s-1", [0, 18]),
        ("d-1", [0, 27]),
        ("a-1", [0, 36]),
        ("left-1", [0, 2]),
        ("up-1", [0, 3]),
        ("down-1", [0, 4]),
        ("w-1,right-2,s-1", [0, 9, 1, 1, 18]),
    ],
)
def test_known_action_labels(pose, actions):
    t = trajectory_from_pose_string(pose)
    assert t.actions.tolist() == actions
    assert t.actions.dtype == np.int64


def test_forward_step_moves_along_camera_z():
    t = trajectory_from_pose_string("w-1")
    assert np.array_equal(t.c2w[0], np.eye(4))
    expected = np.eye(4)
    expected[2, 3] = 0.08
    assert np.array_equal(t.c2w[1], expected)
    # viewmats are world-to-camera: the world origin is 0.08 behind the moved camera
    assert np.allclose(t.viewmats[1][:3, 3], [0, 0, -0.08])


def test_axes_are_opencv_like():
    # strafe: d -> +x, a -> -x
    assert np.allclose(trajectory_from_pose_string("d-1").c2w[1][:3, 3], [0.08, 0, 0])
    assert np.allclose(trajectory_from_pose_string("a-1").c2w[1][:3, 3], [-0.08, 0, 0])
    # pitch up turns the forward axis (third column of R) toward -y (up in OpenCV axes)
    fwd = trajectory_from_pose_string("up-1").c2w[1][:3, 2]
    assert fwd[1] < 0 and np.isclose(fwd[1], -np.sin(np.deg2rad(3)))


def test_yaw_right_90_degrees_then_forward_moves_along_plus_x():
    t = trajectory_from_pose_string("right-30,w-1")
    assert len(t) == 32
    R = t.c2w[30][:3, :3]
    # 30 steps of 3 degrees = rot_y(+90): the camera's forward axis now points along world +x
    assert np.allclose(R, [[0, 0, 1], [0, 1, 0], [-1, 0, 0]], atol=1e-12)
    assert np.allclose(t.c2w[31][:3, 3], [0.08, 0, 0], atol=1e-12)
    assert t.actions[31] == 9  # still "forward" in the camera frame


def test_intrinsics_are_normalised():
    t = trajectory_from_pose_string("w-2")
    K = t.intrinsics
    assert K.shape == (3, 3, 3) and K.dtype == np.float64
    assert np.array_equal(K[:, 0, 0], np.full(3, 969.6969696969696 / 1920.0))
    assert np.array_equal(K[:, 1, 1], np.full(3, 969.6969696969696 / 1080.0))
    assert np.all(K[:, 0, 2] == 0.5) and np.all(K[:, 1, 2] == 0.5)
    assert np.isclose(K[0, 0, 0], 0.50505, atol=1e-5) and np.isclose(K[0, 1, 1], 0.89787, atol=1e-5)


def test_trajectory_arrays_are_readonly_and_typed():
    t = trajectory_from_pose_string("w-3")
    for a, shape, dtype in [
        (t.c2w, (4, 4, 4), np.float64),
        (t.viewmats, (4, 4, 4), np.float64),
        (t.intrinsics, (4, 3, 3), np.float64),
        (t.actions, (4,), np.int64),
    ]:
        assert a.shape == shape and a.dtype == dtype
        with pytest.raises(ValueError):
            a[0] = 0
    assert "w-3" in t.source


def test_whitespace_is_ignored():
    a = trajectory_from_pose_string("w-3,right-2")
    b = trajectory_from_pose_string("  w - 3 ,\tright-2 ")
    assert np.array_equal(a.c2w, b.c2w) and np.array_equal(a.actions, b.actions)
    assert parse_pose_string(" up-02 ") == [PoseCommand("up", 2)]


def test_for_chunks():
    t = trajectory_from_pose_string("w-31")
    assert len(t) == 32
    assert t.for_chunks(8) is t
    two = t.for_chunks(2)
    assert len(two) == 8 and np.array_equal(two.viewmats, t.viewmats[:8])
    assert np.array_equal(two.actions, t.actions[:8])
    with pytest.raises(PoseError) as e:
        t.for_chunks(9)
    msg = str(e.value)
    assert "36" in msg and "32" in msg and "w-35" in msg
    with pytest.raises(PoseError, match="w-7"):
        trajectory_from_pose_string("w-4").for_chunks(2)
    with pytest.raises(PoseError, match="positive integer"):
        t.for_chunks(0)


def test_load_trajectory_dispatches_on_json_suffix(tmp_path):
    t = trajectory_from_pose_string("w-3,left-2")
    path = write_json(tmp_path / "traj.json", t.c2w)
    for spec in (str(path), path):
        u = load_trajectory(spec)
        assert np.array_equal(u.viewmats, t.viewmats) and np.array_equal(u.actions, t.actions)
        assert "traj.json" in u.source
    assert np.array_equal(load_trajectory("w-3,left-2").actions, t.actions)
    with pytest.raises(PoseError, match="missing.json"):
        load_trajectory(str(tmp_path / "missing.json"))


# ------------------------------------------------------------------------------------------
# Pose-string errors


def test_error_message_format():
    with pytest.raises(PoseError) as e:
        parse_pose_string("w-3,x-2")
    assert str(e.value) == (
        "pose 'w-3,x-2': command 2 'x-2' at char 4: unknown action 'x'; "
        "use one of w, s, a, d, up, down, left, right"
    )
    assert e.value.token == "x-2"
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize(
    "pose, token, fragment",
    [
        ("right-0.5", "right-0.5", "not a whole number"),
        ("w-3.0", "w-3.0", "not a whole number"),
        ("w-1e1", "w-1e1", "not a whole number"),
        ("w-0", "w-0", "at least 1"),
        ("w--3", "w--3", "exactly one '-'"),
        ("w-3,,d-2", "", "command 2 '' at char 4: empty command"),
        ("w-3,", "", "empty command"),
        ("w", "w", "exactly one '-'"),
        ("W-3", "W-3", "unknown action 'W'"),
        ("w-3, jump-2", "jump-2", "command 2 'jump-2' at char 5"),
        (f"w-{MAX_STEPS},d-1", "d-1", f"more than {MAX_STEPS} steps"),
    ],
)
def test_bad_pose_strings(pose, token, fragment):
    with pytest.raises(PoseError) as e:
        parse_pose_string(pose)
    assert e.value.token == token
    assert fragment in str(e.value) and f"'{token}'" in str(e.value)


@pytest.mark.parametrize("pose", ["", "   "])
def test_empty_pose_string(pose):
    with pytest.raises(PoseError, match="no commands"):
        trajectory_from_pose_string(pose)


# ------------------------------------------------------------------------------------------
# Properties

commands = st.lists(st.tuples(st.sampled_from(sorted(ACTIONS)), st.integers(1, 12)), min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(commands, st.sampled_from([",", ", ", " , ", ",\t"]))
def test_valid_command_lists_round_trip(cmds, sep):
    pose = sep.join(f"{a}-{n}" for a, n in cmds)
    assert parse_pose_string(pose) == [PoseCommand(a, n) for a, n in cmds]
    t = trajectory_from_pose_string(pose)
    n = sum(k for _, k in cmds) + 1
    assert len(t) == n and t.c2w.shape == (n, 4, 4) and t.intrinsics.shape == (n, 3, 3)
    assert np.allclose(t.viewmats @ t.c2w, np.eye(4), atol=1e-9)
    assert t.actions[0] == 0
    assert 0 <= t.actions.min() and t.actions.max() <= 80
    # every step's label depends only on its action (motion is relative to the camera frame)
    expected = [0] + [STEP_LABEL[a] for a, k in cmds for _ in range(k)]
    assert t.actions.tolist() == expected


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.text(alphabet="wsadupdownleftrigh-,0123456789. x\t", max_size=30),
        st.text(max_size=20),
    )
)
def test_garbage_parses_or_raises_pose_error(pose):
    try:
        t = trajectory_from_pose_string(pose)
    except PoseError as e:
        assert e.token in str(e)
        assert e.token in pose
    else:
        assert len(t) >= 2 and 0 <= t.actions.min() and t.actions.max() <= 80


# ------------------------------------------------------------------------------------------
# JSON files


def test_json_round_trip(tmp_path):
    t = trajectory_from_pose_string("w-5,right-10,up-3,a-2")
    u = load_trajectory_json(write_json(tmp_path / "t.json", t.c2w))
    assert np.array_equal(u.c2w, t.c2w)
    assert np.array_equal(u.viewmats, t.viewmats)
    assert np.array_equal(u.intrinsics, t.intrinsics)
    assert np.array_equal(u.actions, t.actions)


def test_json_integer_entries_and_key_order(tmp_path):
    # integer K (the official in-place division would fail on it) and keys out of file order
    eye = np.eye(4, dtype=int).tolist()
    moved = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1]]
    K = [[1000, 0, 500], [0, 1000, 250], [0, 0, 1]]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"1": {"extrinsic": moved, "K": K}, "0": {"extrinsic": eye, "K": K}}))
    t = load_trajectory_json(path)
    assert t.actions.tolist() == [0, 9]
    assert np.array_equal(t.intrinsics[0], [[1.0, 0, 0.5], [0, 2.0, 0.5], [0, 0, 1]])


def _entries(n=4):
    t = trajectory_from_pose_string(f"w-{n - 1}")
    return {str(i): {"extrinsic": t.c2w[i].tolist(), "K": DEFAULT_K.tolist()} for i in range(n)}


def _bad(tmp_path, entries):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(PoseError) as e:
        load_trajectory_json(path)
    assert "bad.json" in str(e.value)
    return str(e.value)


def test_json_missing_key(tmp_path):
    entries = _entries()
    del entries["2"]
    msg = _bad(tmp_path, entries)
    assert 'entry "2" is missing' in msg and "'3'" in msg


def test_json_wrong_shape(tmp_path):
    entries = _entries()
    entries["1"]["extrinsic"] = entries["1"]["extrinsic"][:3]
    msg = _bad(tmp_path, entries)
    assert 'entry "1" field extrinsic' in msg and "4x4" in msg


def test_json_non_finite(tmp_path):
    entries = _entries()
    entries["3"]["K"][0][0] = float("nan")
    msg = _bad(tmp_path, entries)
    assert 'entry "3" field K' in msg and "non-finite" in msg


def test_json_singular_extrinsic(tmp_path):
    entries = _entries()
    entries["2"]["extrinsic"] = np.zeros((4, 4)).tolist()
    msg = _bad(tmp_path, entries)
    assert 'entry "2" field extrinsic' in msg and "singular" in msg


def test_json_bad_principal_point(tmp_path):
    entries = _entries()
    entries["0"]["K"][1][2] = 0
    msg = _bad(tmp_path, entries)
    assert 'entry "0" field K' in msg and "cy=0.0" in msg


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda e: e["1"].pop("K"), 'entry "1" has no "K"'),
        (lambda e: e["1"]["extrinsic"][0].__setitem__(0, "1"), "must hold numbers"),
        (lambda e: e["1"]["extrinsic"][0].__setitem__(0, True), "must hold numbers"),
    ],
)
def test_json_bad_fields(tmp_path, mutate, fragment):
    entries = _entries()
    mutate(entries)
    assert fragment in _bad(tmp_path, entries)


@pytest.mark.parametrize(
    "text, fragment",
    [("{not json", "not valid JSON"), ("[]", "non-empty JSON object"), ("{}", "non-empty JSON object")],
)
def test_json_bad_file(tmp_path, text, fragment):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(PoseError) as e:
        load_trajectory_json(path)
    assert fragment in str(e.value) and "bad.json" in str(e.value) and e.value.token == str(path)


def test_json_unreadable(tmp_path):
    with pytest.raises(PoseError, match="nope.json"):
        load_trajectory_json(tmp_path / "nope.json")


def test_trajectory_rejects_inconsistent_arrays():
    t = trajectory_from_pose_string("w-2")
    with pytest.raises(ValueError, match="actions"):
        Trajectory(t.c2w, t.viewmats, t.intrinsics, t.actions[:2], "x")
