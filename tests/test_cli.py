"""`worldplay run` end to end on the tiny preset, and its refusals."""

from __future__ import annotations

import json
import os
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


# ---------------------------------------------------------------------------------------------
# bad input is refused in one line, exit 2, before any model is built, with nothing written


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the run gets as far as building a model."""
    import worldplay.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the bad input was refused")

    monkeypatch.setattr(worldplay.models, "random_models", refuse)
    monkeypatch.setattr(worldplay.models, "load_real_models", refuse)


def _refused(capsys, code) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    ("device", "needle"),
    [
        ("banana", "--device 'banana' is not a device; use cpu, cuda or cuda:N"),
        ("meta", "--device meta: worldplay runs on cpu or cuda"),
        pytest.param("cuda", "--device cuda: ", marks=pytest.mark.skipif(
            __import__("torch").cuda.is_available(), reason="a GPU is present")),
        ("cuda:99", "--device cuda:99: "),
    ],
)
def test_bad_device_is_refused(tmp_path, image, capsys, no_model_load, device, needle):
    out = tmp_path / "out" / "v.mp4"
    err = _refused(capsys, main(["run", "--image", str(image), "--preset", "tiny", "--random-init", "0",
                                 "--pose", "w-3", "--num-chunk", "1", "--out", str(out), "--device", device]))
    assert needle in err
    assert not out.parent.exists()


def test_bad_decode_device_is_refused(tmp_path, image, capsys, no_model_load):
    err = _refused(capsys, _run(image, tmp_path / "v.mp4", "--pose", "w-3", "--num-chunk", "1",
                                "--decode-device", "banana"))
    assert "--decode-device 'banana' is not a device" in err


def test_hub_location_without_repo_id_is_refused(tmp_path, image, capsys, no_model_load):
    hf = "hf://@" + "a" * 40
    err = _refused(capsys, main(["run", "--image", str(image), "--preset", "tiny", "--device", "cpu", "--pose", "w-3",
                                 "--num-chunk", "1", "--out", str(tmp_path / "v.mp4"), "--checkpoint", hf,
                                 "--base", str(tmp_path)]))
    assert f"{hf}: '' is not a Hugging Face repo id" in err


def test_offline_hub_miss_is_one_line(tmp_path, image, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hf = "hf://tencent/HY-WorldPlay@" + "e" * 40
    err = _refused(capsys, main(["run", "--image", str(image), "--preset", "tiny", "--device", "cpu", "--pose", "w-3",
                                 "--num-chunk", "1", "--out", str(tmp_path / "v.mp4"), "--checkpoint", hf,
                                 "--base", str(tmp_path)]))
    assert f"{hf}: not in the local Hugging Face cache" in err and "HF_HUB_OFFLINE" in err and "HF_TOKEN" in err
    assert not (tmp_path / "v.mp4").exists()


@pytest.mark.parametrize("size", [("--height", "0"), ("--width", "0"), ("--height", "-64"), ("--width", "48")])
def test_bad_size_is_refused_not_replaced_by_the_default(tmp_path, image, capsys, no_model_load, size):
    out = tmp_path / "v.mp4"
    err = _refused(capsys, _run(image, out, "--pose", "w-3", "--num-chunk", "1", *size))
    assert f"{size[0]} {size[1]}: must be a positive multiple of 32" in err
    assert list(tmp_path.iterdir()) == [image]


def test_a_size_multiple_of_the_stride_is_used(tmp_path, image):
    out = tmp_path / "v.mp4"
    assert _run(image, out, "--pose", "w-3", "--num-chunk", "1", "--height", "32", "--width", "64") == 0
    assert read_video(out).shape == (13, 32, 64, 3)


def test_output_in_a_file_instead_of_a_folder_is_refused(tmp_path, image, capsys, no_model_load):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file")
    err = _refused(capsys, _run(image, blocker / "v.mp4", "--pose", "w-3", "--num-chunk", "1"))
    assert f"cannot write output video '{blocker / 'v.mp4'}': '{blocker}' is not a directory" in err
    assert "Errno" not in err


def test_output_that_is_a_directory_is_refused(tmp_path, image, capsys, no_model_load):
    (tmp_path / "v.mp4").mkdir()
    err = _refused(capsys, _run(image, tmp_path / "v.mp4", "--pose", "w-3", "--num-chunk", "1", "--overwrite"))
    assert "is a directory" in err  # refused before this change too; kept as a guard


def test_stats_path_that_is_a_directory_is_refused_before_the_run(tmp_path, image, capsys, no_model_load):
    (tmp_path / "v.json").mkdir()
    err = _refused(capsys, _run(image, tmp_path / "v.mp4", "--pose", "w-3", "--num-chunk", "1", "--overwrite"))
    assert f"cannot write stats file '{tmp_path / 'v.json'}': it is a directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["start.png", "v.json"]  # no video without its stats


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_refused(tmp_path, image, capsys, no_model_load):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        err = _refused(capsys, _run(image, folder / "v.mp4", "--pose", "w-3", "--num-chunk", "1"))
    finally:
        folder.chmod(0o700)
    assert f"cannot write output video '{folder / 'v.mp4'}': Permission denied" in err


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs Linux sysfs (no regular files, even for root)")
def test_output_folder_without_write_access_is_refused(image, capsys, no_model_load):
    err = _refused(capsys, _run(image, "/sys/kernel/v.mp4", "--pose", "w-3", "--num-chunk", "1"))
    assert "cannot write output video '/sys/kernel/v.mp4': " in err and "Errno" not in err


def test_os_errors_read_as_sentences(tmp_path, image, capsys, monkeypatch):
    """A failure no check foresaw (here: the stats write) is one line without '[Errno N]'."""
    import worldplay.media

    def denied(path, obj, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(worldplay.media, "atomic_write_json", denied)
    err = _refused(capsys, _run(image, tmp_path / "v.mp4", "--pose", "w-3", "--num-chunk", "1"))
    assert err.strip() == f"worldplay run: error: cannot access {tmp_path / 'v.json'}: Permission denied"
