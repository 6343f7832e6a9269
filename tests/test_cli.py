"""`worldplay run` end to end on the tiny preset, and its refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from worldplay.cli import build_parser, main
from worldplay.media import read_video


@pytest.fixture
def image(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "start.png"
    Image.fromarray(rng.integers(0, 255, (80, 120, 3), dtype=np.uint8)).save(path)
    return path


def _run(image, out, *extra):
    return main(["run", "--image", str(image), "--preset", "tiny", "--random-init", "0", "--device", "cpu",
                 "--out", str(out), "--no-progress", *extra])


def test_run_writes_mp4_and_stats(tmp_path, image):
    out = tmp_path / "video.mp4"
    assert _run(image, out, "--pose", "w-19,s-12", "--num-chunk", "8") == 0
    frames = read_video(out)
    assert frames.shape == (16 * 8 - 3, 64, 96, 3)
    stats = json.loads(out.with_suffix(".json").read_text())
    assert stats["frames"] == 125 and len(stats["chunks"]) == 8
    assert stats["weights"]["dit"]["describe"] == "random-init:0"
    assert len(stats["chunks"][7]["memory_frames"]) == 16
    assert {"prefill", "dit", "decode"} <= set(stats["chunks"][7]["timings_ms"])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_existing_output_is_refused_then_overwritten(tmp_path, image, capsys):
    out = tmp_path / "video.mp4"
    out.write_bytes(b"keep me")
    assert _run(image, out, "--pose", "w-3", "--num-chunk", "1") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert _run(image, out, "--pose", "w-3", "--num-chunk", "1", "--overwrite") == 0
    assert read_video(out).shape[0] == 13


@pytest.mark.parametrize(
    ("pose", "chunks", "needle"),
    [
        ("w-3,x-2", "1", "'x-2'"),
        ("w-3,right-0.5", "1", "right-0.5"),
        ("w-31", "9", "36"),
    ],
)
def test_bad_pose_fails_cleanly(tmp_path, image, capsys, pose, chunks, needle):
    out = tmp_path / "video.mp4"
    assert _run(image, out, "--pose", pose, "--num-chunk", chunks) == 2
    err = capsys.readouterr().err
    assert needle in err and "error" in err
    assert list(tmp_path.iterdir()) == [image]  # nothing written


def test_unreadable_image_fails_cleanly(tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    assert _run(bad, tmp_path / "v.mp4", "--pose", "w-3", "--num-chunk", "1") == 2
    assert "broken.png" in capsys.readouterr().err
    assert not (tmp_path / "v.mp4").exists()


def test_weights_are_required(tmp_path, image, capsys):
    code = main(["run", "--image", str(image), "--pose", "w-3", "--num-chunk", "1", "--out", str(tmp_path / "v.mp4")])
    assert code == 2 and "--random-init" in capsys.readouterr().err


def test_help_documents_every_option():
    run = build_parser()._subparsers._group_actions[0].choices["run"]
    text = run.format_help()
    for action in run._actions:
        for flag in action.option_strings:
            assert flag in text
        assert action.help, action.option_strings


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "worldplay", "run", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--num-chunk" in done.stdout


def test_two_device_run_writes_the_same_video(tmp_path, image):
    """--decode-device: the DiT and the decoder in two processes (gloo on the CPU) give the frames
    of the one-device run."""
    one, two = tmp_path / "one.mp4", tmp_path / "two.mp4"
    assert _run(image, one, "--pose", "w-11", "--num-chunk", "3") == 0
    assert _run(image, two, "--pose", "w-11", "--num-chunk", "3", "--decode-device", "cpu") == 0
    assert np.array_equal(read_video(one), read_video(two))
    stats = json.loads(two.with_suffix(".json").read_text())
    assert stats["devices"] == {"dit": "cpu", "decode": "cpu"} and stats["frames"] == 16 * 3 - 3
    assert "interval" in stats["chunks"][2]["timings_ms"]


def test_fast_and_reuse_options_reach_the_settings(tmp_path, image):
    out = tmp_path / "v.mp4"
    assert _run(image, out, "--pose", "w-11", "--num-chunk", "3", "--fast", "--memory-mode", "reuse") == 0
    settings = json.loads(out.with_suffix(".json").read_text())["settings"]
    assert settings["memory_mode"] == "reuse" and settings["attention_backend"] == "sdpa"  # CPU: no cuDNN/FA4


@pytest.mark.parametrize("backend", ["fa4", "cudnn"])
def test_gpu_only_attention_on_the_cpu_fails_cleanly(tmp_path, image, capsys, backend):
    assert _run(image, tmp_path / "v.mp4", "--pose", "w-3", "--num-chunk", "1", "--attention", backend) == 2
    err = capsys.readouterr().err
    assert f"attention backend '{backend}' runs only on CUDA" in err and "sdpa" in err
    assert not (tmp_path / "v.mp4").exists()
