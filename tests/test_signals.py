"""SIGTERM and SIGKILL in the middle of a run: real processes, real signals.

SIGTERM must leave nothing partial (the run cleans up and exits 143); SIGKILL cannot be caught,
so what it leaves must be removed by the next start, and never a live run's temporary files.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from worldplay import leftovers
from worldplay.cli import main
from worldplay.interrupts import EXIT_SIGTERM

REPO = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict[str, str]:
    # This checkout's package, whatever the current directory or an installed copy.
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "in" / "start.png"
    path.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 120, 3), dtype=np.uint8)).save(path)
    return path


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 240.0):
    """Poll until ``predicate()`` is truthy (the run is mid-way); fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before the point to interrupt it: "
                        f"{proc.stderr.read()}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail("the run did not reach the point to interrupt it in time")


def _partials(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if ".partial-" in p.name]


def _start_cli_run(image: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "worldplay", "run", "--image", str(image), "--preset", "tiny", "--random-init",
           "0", "--device", "cpu", "--pose", "w-39", "--num-chunk", "10", "--no-progress", "--out", str(out)]
    return subprocess.Popen(cmd, cwd=out.parent, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_sigterm_during_worldplay_run_leaves_nothing(tmp_path, image):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = _start_cli_run(image, out_dir / "v.mp4")
    (partial,) = _wait_for(lambda: _partials(out_dir), proc)  # ffmpeg is writing chunk 0's frames
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_SIGTERM, err
    assert list(out_dir.iterdir()) == []  # no partial, no video, no stats
    assert err.strip().splitlines()[-1] == ("worldplay run: terminated (SIGTERM); the unfinished output and its "
                                            "temporary files were removed")
    assert leftovers.owner_of(partial.name).pid == proc.pid  # the partial named its owner


def test_sigkill_leftover_is_removed_by_the_next_run(tmp_path, image):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = _start_cli_run(image, out_dir / "killed.mp4")
    (partial,) = _wait_for(lambda: _partials(out_dir), proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert partial.exists()  # SIGKILL cannot be caught: this is what the next start must handle
    # A live process's partial next to it must survive the sweep.
    live = out_dir / f".other.mp4{leftovers.PARTIAL_MARK}{leftovers.owner_tag()}-0000.mp4"
    live.write_bytes(b"being written")
    assert main(["run", "--image", str(image), "--preset", "tiny", "--random-init", "0", "--device", "cpu",
                 "--pose", "w-3", "--num-chunk", "1", "--no-progress", "--out", str(out_dir / "next.mp4")]) == 0
    assert sorted(p.name for p in out_dir.iterdir()) == [live.name, "next.json", "next.mp4"]


# ---------------------------------------------------------------------------------------------
# experiment runs


@pytest.fixture
def experiment_workspace(tmp_path):
    from test_experiments import make_experiments_dir

    exp, data = make_experiments_dir(tmp_path)
    # runs/videos under the working directory: the default that `experiment check` looks at
    dirs = {"results": tmp_path / "results", "videos": tmp_path / "runs" / "videos", "scratch": tmp_path / "scratch"}
    env = _env(WORLDPLAY_DATA_DIR=str(data), WORLDPLAY_CACHE_DIR=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "worldplay", "experiment", "--experiments-dir", str(exp), "--results-root",
           str(dirs["results"]), "run", "rollouts-tiny-cpu", "--allow-dirty", "--video-dir", str(dirs["videos"]),
           "--scratch-dir", str(dirs["scratch"]), "--no-progress"]
    return exp, dirs, env, cmd


def _mid_experiment(dirs):
    """The run's temporary result and scratch folders and a video being written, all present."""
    tmp_results = list(dirs["results"].glob(".tmp-*")) if dirs["results"].is_dir() else []
    videos = _partials(dirs["videos"]) if dirs["videos"].is_dir() else []
    scratch = list(dirs["scratch"].iterdir()) if dirs["scratch"].is_dir() else []
    return (tmp_results, videos, scratch) if tmp_results and videos and scratch else None


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_sigterm_during_experiment_run_leaves_nothing(experiment_workspace):
    exp, dirs, env, cmd = experiment_workspace
    proc = subprocess.Popen(cmd, cwd=exp.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _mid_experiment(dirs), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_SIGTERM, err
    assert "terminated (SIGTERM)" in err
    for directory in dirs.values():
        assert _entries(directory) == [], directory


def test_sigkill_leftovers_of_an_experiment_are_reported_then_removed(experiment_workspace, monkeypatch, capsys):
    """SIGKILL mid-run leaves the .tmp- result and video folders and the scratch folder; check
    reports them, and the next run (a cheap stand-in kind, the real runner) removes them."""
    from worldplay.experiments import kinds
    from worldplay.experiments.context import KindOutput
    from worldplay.experiments.runner import RunOptions, run_experiment

    exp, dirs, env, cmd = experiment_workspace
    proc = subprocess.Popen(cmd, cwd=exp.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    (tmp_results, _, scratch) = _wait_for(lambda: _mid_experiment(dirs), proc)
    proc.kill()
    proc.communicate(timeout=60)
    left = [*tmp_results, *dirs["videos"].glob(".tmp-*"), *scratch]
    assert len(left) == 3 and all(p.exists() for p in left)

    monkeypatch.chdir(exp.parent)
    assert main(["experiment", "--experiments-dir", str(exp), "--results-root", str(dirs["results"]), "check",
                 "rollouts-tiny-cpu"]) == 1  # no result: a leftover is not one
    err = capsys.readouterr().err
    assert err.count(f"left by process {proc.pid}, which is gone; the next run removes it") == 2  # results, videos

    # A running run's temporary folder (ours) must survive the next start.
    live = dirs["results"] / f".tmp-other-run{leftovers.owner_tag()}"
    live.mkdir()
    monkeypatch.setenv("WORLDPLAY_DATA_DIR", env["WORLDPLAY_DATA_DIR"])
    monkeypatch.setattr(kinds, "kind_runner", lambda kind: lambda ctx: KindOutput(summary={}, chunk_rows=[]))
    options = RunOptions(allow_dirty=True, experiments_dir=exp, results_root=dirs["results"],
                         video_dir=dirs["videos"], scratch_dir=dirs["scratch"], progress=False)
    result = run_experiment("rollouts-tiny-cpu", options)
    assert not any(p.exists() for p in left)
    assert _entries(dirs["results"]) == [live.name, "rollouts-tiny-cpu"] and result.is_dir()
    assert _entries(dirs["videos"]) == [] and _entries(dirs["scratch"]) == []
