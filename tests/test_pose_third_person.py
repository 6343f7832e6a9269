"""Third-person action labels (the official pose_to_input(tps=True)) against the official
function's own outputs, committed in tests/data/pose_tps_official.json (made by
scripts/check_pose_vs_official.py --write-tps-table from hyvideo/generate.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worldplay.cli import build_parser
from worldplay.pose import load_trajectory, load_trajectory_json, trajectory_from_pose_string

TABLE = json.loads((Path(__file__).parent / "data" / "pose_tps_official.json").read_text())["cases"]


@pytest.mark.parametrize("case", TABLE, ids=lambda c: f"seed{c['seed']}")
def test_labels_equal_the_official_function_in_both_modes(tmp_path, case):
    path = tmp_path / "trajectory.json"
    path.write_text(json.dumps(case["trajectory"]))
    assert load_trajectory_json(path).actions.tolist() == case["first_person"]
    third = load_trajectory_json(path, third_person=True)
    assert third.actions.tolist() == case["third_person"]
    assert "third person" in third.source


def test_the_table_exercises_the_difference():
    """Each case moves and turns in one step somewhere: the modes differ, so the test above can fail."""
    assert all(case["first_person"] != case["third_person"] for case in TABLE)
    for case in TABLE:  # a third-person step keeps the rotation class and may only lose its translation
        for first, third in zip(case["first_person"], case["third_person"], strict=True):
            assert first % 9 == third % 9 and third // 9 in (0, first // 9)


@pytest.mark.parametrize("pose", ["w-31", "w-5,right-10,s-4,a-3,d-2,up-4,down-4,left-7", "up-30,right-30,w-5,d-5"])
def test_pose_strings_label_the_same_in_both_modes(pose):
    assert (trajectory_from_pose_string(pose, third_person=True).actions.tolist()
            == trajectory_from_pose_string(pose).actions.tolist())


def test_run_has_a_third_person_flag(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(TABLE[0]["trajectory"]))
    args = build_parser().parse_args(["run", "--image", "x.png", "--pose", str(path), "--num-chunk", "1",
                                      "--out", "v.mp4", "--third-person"])
    assert args.third_person is True
    assert load_trajectory(args.pose, third_person=args.third_person).actions.tolist() == TABLE[0]["third_person"]
