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
    from worldplay.pose import excerpt

    try:
        t = trajectory_from_pose_string(pose)
    except PoseError as e:
        assert excerpt(e.token, 40) in str(e)  # shown with control characters escaped
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
    # (split off the file name: tmp_path holds this test's name, so any word of it would match)
    assert 'entry "2" field extrinsic' in msg and "scaled or sheared" in msg.split("bad.json")[1]


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


# ------------------------------------------------------------------------------------------
# Bad-input audit (issue 12): every bad value is a one-line PoseError at the boundary


def _one_line(e: PoseError, limit: int = 400) -> str:
    msg = str(e)
    assert len(msg.splitlines()) == 1 and len(msg) <= limit, msg
    return msg


def test_a_5000_digit_duration_is_a_pose_error():
    # int() of more than 4300 digits raises a bare ValueError (Python's int_max_str_digits)
    with pytest.raises(PoseError) as e:
        parse_pose_string("w-" + "9" * 5000)
    assert f"more than {MAX_STEPS} steps" in _one_line(e.value)


def test_a_long_pose_is_shortened_in_messages_with_its_length():
    pose = "x" * 100_000 + "-1"
    with pytest.raises(PoseError) as e:
        parse_pose_string(pose)
    msg = _one_line(e.value)
    assert "(100002 characters)" in msg and "unknown action" in msg


def test_line_breaks_in_a_pose_stay_on_one_line():
    with pytest.raises(PoseError) as e:
        parse_pose_string("w-3,\nx-2\r\n")
    assert "x-2" in _one_line(e.value)


def test_for_chunks_suggests_only_poses_the_step_cap_allows():
    t = trajectory_from_pose_string("w-4")
    with pytest.raises(PoseError) as e:
        t.for_chunks(1_000_000)
    msg = _one_line(e.value)
    assert "w-3999999" not in msg
    from worldplay.pose import MAX_CHUNKS

    assert MAX_CHUNKS == (MAX_STEPS + 1) // 4 and f"at most {MAX_CHUNKS} chunks" in msg
    # the largest count that fits still gets a usable suggestion
    with pytest.raises(PoseError, match=f"'w-{MAX_CHUNKS * 4 - 1}'"):
        t.for_chunks(MAX_CHUNKS)
    assert len(parse_pose_string(f"w-{MAX_CHUNKS * 4 - 1}")) == 1


def test_counts_in_messages_are_pluralised():
    with pytest.raises(PoseError) as e:
        trajectory_from_pose_string("w-2").for_chunks(1)
    msg = str(e.value)
    assert "1 chunk needs" in msg and "3 latents" in msg and "1 chunks" not in msg
    with pytest.raises(PoseError) as e:
        trajectory_from_pose_string("w-4").for_chunks(2)
    assert "at most 1 chunk with" in str(e.value) and "1 chunks" not in str(e.value)


def _rigid(i: int) -> np.ndarray:
    return trajectory_from_pose_string("right-2,w-2").c2w[i].copy()


def _with(m: np.ndarray, edit) -> np.ndarray:
    m = m.copy()
    edit(m)
    return m


@pytest.mark.parametrize(
    "extrinsic, fragment",
    [
        (_with(_rigid(2), lambda m: m.__setitem__((slice(0, 3), slice(0, 3)), m[:3, :3] * 2)), "scaled or sheared"),
        (_with(_rigid(2), lambda m: m.__setitem__((slice(0, 3), slice(0, 3)), m[:3, :3] * 1e-7)),
         "scaled or sheared"),
        (_with(_rigid(2), lambda m: m.__setitem__((0, 1), m[0, 1] + 0.5)), "scaled or sheared"),
        (_with(_rigid(2), lambda m: m.__setitem__((slice(None), 0), -m[:, 0])), "determinant -1"),
        (_with(_rigid(2), lambda m: m.__setitem__(3, [0.1, 0, 0, 1])), "last row"),
        (_with(_rigid(2), lambda m: m.__setitem__(3, [0, 0, 0, 2])), "last row"),
        (_with(_rigid(2), lambda m: m.__setitem__((0, 3), 1e9)), "translation"),
    ],
    ids=["scaled-2x", "scaled-1e-7", "sheared", "reflection", "last-row", "last-row-scale", "far"],
)
def test_json_extrinsic_must_be_rigid(tmp_path, extrinsic, fragment):
    entries = _entries()
    entries["2"]["extrinsic"] = extrinsic.tolist()
    path = tmp_path / "traj.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(PoseError) as e:
        load_trajectory_json(path)
    from worldplay.pose import RIGID_TOLERANCE

    msg = _one_line(e.value).split("traj.json", 1)[1]
    assert 'entry "2" field extrinsic' in msg and fragment in msg
    if fragment != "translation":
        assert f"{RIGID_TOLERANCE:g}" in msg or "determinant" in msg


def test_json_rotations_rounded_like_real_files_are_accepted(tmp_path):
    t = trajectory_from_pose_string("right-7,up-3,w-5")
    c2w = np.round(t.c2w, 4)  # 4 decimals, as a hand-written or float32 file might hold
    u = load_trajectory_json(write_json(tmp_path / "t.json", c2w))
    assert np.array_equal(u.c2w, c2w)


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda K: K[0].__setitem__(0, 1e300), "above 1e+06"),
        (lambda K: K[1].__setitem__(1, 1e-3), "fy / (2 cy)"),
        (lambda K: K[0].__setitem__(0, 2e5), "fx / (2 cx)"),
        (lambda K: K[0].__setitem__(1, 3.0), "skew"),
        (lambda K: K[2].__setitem__(2, 0.0), "last row"),
        (lambda K: K[0].__setitem__(0, 10**400), "non-finite"),
    ],
    ids=["fx-1e300", "fy-tiny", "fx-huge", "skew", "last-row", "int-beyond-float"],
)
def test_json_intrinsics_must_be_sane(tmp_path, edit, fragment):
    entries = _entries()
    edit(entries["1"]["K"])
    path = tmp_path / "traj.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(PoseError) as e:
        load_trajectory_json(path)
    msg = _one_line(e.value)
    assert 'entry "1" field K' in msg and fragment in msg


def test_json_deep_nesting_is_one_line_not_a_recursion_error(tmp_path):
    for text in ["[" * 100_000 + "]" * 100_000, '{"0": ' + "[" * 100_000 + "]" * 100_000 + "}",
                 '{"0": {"extrinsic": ' + "[" * 500 + "]" * 500 + ', "K": 1}}']:
        path = tmp_path / "deep.json"
        path.write_text(text)
        with pytest.raises(PoseError) as e:
            load_trajectory_json(path)
        assert "nests more than" in _one_line(e.value)


def test_json_file_size_is_checked_before_reading(tmp_path):
    path = tmp_path / "huge.json"
    with open(path, "wb") as f:
        f.truncate(512 * 2**20)  # sparse: 512 MiB that nothing needs to read
    with pytest.raises(PoseError) as e:
        load_trajectory_json(path)
    assert "512.0 MiB, more than the 8 MiB" in _one_line(e.value)


def test_json_entry_count_is_capped_like_the_step_count(tmp_path):
    MAX_LATENTS = MAX_STEPS + 1  # a pose string of MAX_STEPS steps
    entry = {"extrinsic": np.eye(4, dtype=int).tolist(), "K": [[9, 0, 9], [0, 9, 9], [0, 0, 1]]}
    path = tmp_path / "long.json"
    path.write_text(json.dumps({str(i): entry for i in range(MAX_LATENTS + 1)}))
    with pytest.raises(PoseError) as e:
        load_trajectory_json(path)
    assert f"{MAX_LATENTS + 1} entries, more than the {MAX_LATENTS}" in _one_line(e.value)


def test_json_read_errors_have_no_errno_noise(tmp_path):
    for path in (tmp_path / "nope.json", tmp_path):
        with pytest.raises(PoseError) as e:
            load_trajectory_json(path)
        msg = _one_line(e.value)
        assert "[Errno" not in msg and str(path) in msg


@pytest.mark.parametrize("key", ["²", "9" * 5000, "01", "-1"])
def test_json_keys_that_only_look_like_indices_are_named(tmp_path, key):
    # "²".isdigit() is true but int("²") raises, and int() of 5000 digits hits Python's limit
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({key: 1}))
    with pytest.raises(PoseError) as e:
        load_trajectory_json(path)
    assert "unexpected keys" in _one_line(e.value)
