"""``torchrun --nproc-per-node 2 -m worldplay run`` on the CPU (gloo): rank 0 writes the video,
the same bytes as a one-process run; a rank that dies or runs other settings ends the launch
with its error and nothing written. Faults are injected into rank 1 only, by a
``sitecustomize`` on its ``PYTHONPATH`` (no test hook in the code under test)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    from worldplay.media import synthetic_image

    return synthetic_image(tmp_path_factory.mktemp("img") / "img.png", 64, 96, 0)


def _args(image: Path, out: Path) -> list[str]:
    return ["run", "--preset", "tiny", "--random-init", "0", "--device", "cpu", "--image", str(image),
            "--pose", "w-11", "--num-chunk", "3", "--out", str(out), "--no-progress"]


def _torchrun(args: list[str], inject: str | None = None, tmp: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if inject is not None:
        site = tmp / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(textwrap.dedent(inject))
        env["PYTHONPATH"] = f"{site}{os.pathsep}{REPO}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "worldplay", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_ranks_write_the_one_process_video(image, tmp_path):
    one, two = tmp_path / "one.mp4", tmp_path / "two" / "two.mp4"
    two.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "worldplay", *_args(image, one)], cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=600)
    done = _torchrun(_args(image, two))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(45 frames, 2 ranks)" in done.stdout
    assert one.read_bytes() == two.read_bytes()
    stats = json.loads(two.with_suffix(".json").read_text())
    assert stats["ranks"]["size"] == 2 and len(stats["ranks"]["per_rank"]) == 2
    assert sorted(p.name for p in two.parent.iterdir()) == ["two.json", "two.mp4"]


DIE_ON_RANK_1 = """
    import os
    if os.environ.get("RANK") == "1":
        import torch.distributed as dist
        calls = {"n": 0}
        original = dist.all_to_all_single
        def dying(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 12:  # inside chunk 0's DiT
                os._exit(9)
            return original(*args, **kwargs)
        dist.all_to_all_single = dying
"""

OTHER_SEED_ON_RANK_1 = """
    import os
    if os.environ.get("RANK") == "1":
        import argparse
        original = argparse.ArgumentParser.parse_args
        def parse_args(self, args=None, namespace=None):
            import sys
            args = list(sys.argv[1:] if args is None else args)
            return original(self, args + ["--seed", "5"] if "run" in args else args, namespace)
        argparse.ArgumentParser.parse_args = parse_args
"""


@pytest.mark.slow
def test_a_rank_that_dies_leaves_nothing_written(image, tmp_path):
    out = tmp_path / "out" / "video.mp4"
    out.parent.mkdir()
    done = _torchrun(_args(image, out), DIE_ON_RANK_1, tmp_path)
    assert done.returncode != 0
    # rank 0 learns of it from its own watchdog or from torchrun's SIGTERM, whichever comes first;
    # either way it leaves with one line, and torchrun names rank 1 (exit code 9) as the root cause.
    assert re.search(r"worldplay run(: terminated| \(rank 0 of 2\): error: rank 1)", done.stderr), done.stderr[-3000:]
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*exitcode\s*:\s*9", done.stderr)
    assert list(out.parent.iterdir()) == []  # no video, no stats, no partial file


def test_ranks_with_other_settings_are_refused(image, tmp_path):
    out = tmp_path / "out" / "video.mp4"
    out.parent.mkdir()
    done = _torchrun(_args(image, out), OTHER_SEED_ON_RANK_1, tmp_path)
    assert done.returncode != 0
    assert ("worldplay run: error: rank 1 runs with settings = " in done.stderr
            and "but rank 0 with" in done.stderr and "start every rank with the same arguments" in done.stderr)
    assert list(out.parent.iterdir()) == []


def test_torchrun_refuses_a_device_index(image, tmp_path):
    """Each rank takes cuda:LOCAL_RANK; an explicit index is a usage error (exit 2 on every rank)."""
    from worldplay.cli import UsageError, _run_as_rank, build_parser
    from worldplay.ranks.launch import Launch

    args = build_parser().parse_args([*_args(image, tmp_path / "v.mp4"), "--decode-device", "cuda:1"])
    with pytest.raises(UsageError, match="--decode-device is the two-process pipeline"):
        _run_as_rank(args, Launch(rank=0, size=2, local_rank=0))
