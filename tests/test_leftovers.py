"""Owner tags on temporary names: who is gone, who is running, and what a sweep may remove."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from worldplay import leftovers
from worldplay.leftovers import Owner, current_owner, find, owner_of, remove_stale


def _ended_process() -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc


def test_tag_round_trips_and_the_last_tag_wins():
    me = current_owner()
    assert me.pid == os.getpid() and me.state() == "running"
    assert owner_of(f".tmp-a-1-t2-h00000000-run{me.tag()}") == me
    assert owner_of(".tmp-bench-tiny-cpu-20250101T000000Z-abcd1234") is None  # untagged (older versions)


def test_states():
    me = current_owner()
    assert Owner(_ended_process().pid, 1, me.host).state() == "gone"
    if me.start:  # Linux: the start time tells a reused pid from its first owner
        assert Owner(me.pid, me.start + 1, me.host).state() == "gone"
    assert Owner(_ended_process().pid, 1, "ffffffff" if me.host != "ffffffff" else "eeeeeeee").state() == "other host"


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="zombies are visible through /proc")
def test_a_killed_unreaped_process_is_gone():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = leftovers._process_start(proc.pid)
        assert Owner(proc.pid, start, current_owner().host).state() == "running"
        proc.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Owner(proc.pid, start, current_owner().host).state() != "gone":  # a zombie until reaped
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()


def test_sweep_removes_only_what_dead_owners_left(tmp_path):
    me = current_owner()
    dead = Owner(_ended_process().pid, 1, me.host)
    reused = Owner(me.pid, me.start + 1, me.host) if me.start else dead
    elsewhere = Owner(dead.pid, 1, "ffffffff" if me.host != "ffffffff" else "eeeeeeee")
    (tmp_path / f".tmp-x-run{dead.tag()}").mkdir()
    (tmp_path / f".tmp-x-run{dead.tag()}" / "result.json").write_text("{}")
    (tmp_path / f".v.mp4.partial{reused.tag()}-abcd.mp4").write_bytes(b"")
    keep = [
        f".tmp-y-run{me.tag()}",  # a running run's folder
        f".w.mp4.partial{me.tag()}-abcd.mp4",  # a running run's partial
        f".tmp-z-run{elsewhere.tag()}",  # another machine's (shared filesystem)
        ".tmp-old-20250101T000000Z-abcd1234",  # untagged: reported, never removed
        "v.mp4",  # not a temporary name at all
        f"notes{dead.tag()}.txt",  # a tag in a name that is not ours to judge
    ]
    for name in keep:
        (tmp_path / name).write_bytes(b"")
    removed = remove_stale([tmp_path, tmp_path / "missing"])
    gone = [f".tmp-x-run{dead.tag()}", f".v.mp4.partial{reused.tag()}-abcd.mp4"]
    assert sorted(p.name for p in removed) == sorted(gone)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
    states = {item.path.name: item.state for item in find(tmp_path)}
    assert states == {keep[0]: "running", keep[1]: "running", keep[2]: "other host", keep[3]: "unknown owner"}


def test_prefix_sweep_leaves_untagged_names_alone(tmp_path):
    dead = Owner(_ended_process().pid, 1, current_owner().host)
    (tmp_path / f"worldplay-bench{dead.tag()}-k3j2").mkdir()
    (tmp_path / "worldplay-something-else").mkdir()
    assert [p.name for p in remove_stale([tmp_path], prefix="worldplay-")] == [f"worldplay-bench{dead.tag()}-k3j2"]
    assert [p.name for p in tmp_path.iterdir()] == ["worldplay-something-else"]
