"""The ``interactive`` experiment kind: the playback arithmetic of worldplay.serve.measure on
made-up arrival logs (stalls, sustained fps, latency, the keys a chunk should carry), the key
script's syntax, and the kind end to end on the tiny preset (the server played over a real
WebSocket by the scripted client)."""

from __future__ import annotations

import pytest

from worldplay.experiments.schema import ExperimentConfigError, load_config
from worldplay.serve import measure
from worldplay.serve.client import Hold, parse_schedule
from worldplay.serve.measure import Arrival, KeyChange

PERIOD = 1 / 16


def _chunk(chunk: int, frames: int, at_s: float) -> list[Arrival]:
    """A chunk's frames, all arriving at ``at_s`` (the server sends a chunk in one burst)."""
    return [Arrival(chunk, i, at_s) for i in range(frames)]


# -- arithmetic on a synthetic log ------------------------------------------------------------


def test_playback_stalls_and_fps_of_a_log_with_one_late_chunk():
    """Chunk 0 (13 frames) arrives at 1 s and plays until 1.8125 s; chunk 1 arrives at 2 s, so
    playback waits 0.25 s between frames 12 and 13 (one stall of 0.25 - 1/16 s); chunk 2 arrives
    at 2.5 s, before chunk 1 has played out (3 s), so it follows without a gap."""
    log = _chunk(0, 13, 1.0) + _chunk(1, 16, 2.0) + _chunk(2, 16, 2.5)
    shown = measure.playback(log, PERIOD)
    assert shown[:13] == pytest.approx([1.0 + i * PERIOD for i in range(13)])
    assert shown[13] == 2.0 and shown[29] == pytest.approx(3.0) and shown[-1] == pytest.approx(3.9375)
    assert measure.stalls(shown, PERIOD) == [(13, pytest.approx(0.25 - PERIOD))]
    assert measure.sustained_fps(log, shown) == pytest.approx(16.0)  # from chunk 1 on: no stall
    assert measure.chunk_starts(log, shown) == {0: 1.0, 1: 2.0, 2: pytest.approx(3.0)}


def test_a_late_steady_chunk_lowers_the_sustained_fps():
    log = _chunk(0, 13, 0.0) + _chunk(1, 16, 1.0) + _chunk(2, 16, 2.5)  # chunk 2: 0.5 s late
    shown = measure.playback(log, PERIOD)
    assert measure.stalls(shown, PERIOD) == [(13, pytest.approx(1.0 - 12 * PERIOD - PERIOD)),
                                             (29, pytest.approx(0.5))]
    assert measure.sustained_fps(log, shown) == pytest.approx(31 / (2.5 + 15 * PERIOD - 1.0))


@pytest.mark.parametrize(("gap_periods", "stalled"), [(1.0, False), (1.45, False), (1.55, True), (3.0, True)])
def test_a_stall_is_a_gap_over_one_and_a_half_frame_periods(gap_periods, stalled):
    shown = [0.0, PERIOD, PERIOD + gap_periods * PERIOD]
    assert bool(measure.stalls(shown, PERIOD)) is stalled


def test_latency_runs_to_the_first_chunk_that_saw_the_change():
    """Change 1 (sent at 0.5 s) is first seen by chunk 1 (echoed seq 1); change 2 (2.2 s) only by
    chunk 3, which was never shown: no latency for it."""
    changes = [KeyChange(1, frozenset({"w"}), 0.5), KeyChange(2, frozenset({"left"}), 2.2)]
    rows = measure.latencies(changes, {0: 0, 1: 1, 2: 1, 3: 2}, {0: 1.0, 1: 2.0, 2: 3.0})
    assert [(r["chunk"], r["latency_s"]) for r in rows] == [(1, pytest.approx(1.5)), (None, None)]


def test_expected_keys_count_a_tap_between_two_chunks_as_the_server_does():
    """w pressed and released before chunk 1 is sampled: chunk 1 still moves (a tap counts once),
    chunk 2 does not; then left held from change 3 on."""
    changes = [KeyChange(1, frozenset({"w"}), 0.1), KeyChange(2, frozenset(), 0.2),
               KeyChange(3, frozenset({"left"}), 0.3)]
    assert measure.expected_keys(changes, {0: 0, 1: 2, 2: 2, 3: 3, 4: 3}) == {
        0: (), 1: ("w",), 2: (), 3: ("left",), 4: ("left",)}


# -- the key script ---------------------------------------------------------------------------


def test_schedules_trigger_on_time_or_on_a_shown_frame():
    holds = parse_schedule("c3f8:left, 1.5:w, c2:, 0:w+a")
    assert holds == [Hold(0.0, frozenset({"w", "a"})), Hold(1.5, frozenset({"w"})),
                     Hold(None, frozenset(), 2, 0), Hold(None, frozenset({"left"}), 3, 8)]


@pytest.mark.parametrize(("text", "expect"), [("c3f16:w", "frame 0-15"), ("cx:w", "cCHUNK"), ("c1:jump", "keys"),
                                              ("-1:w", ">= 0"), ("soon:w", "SECONDS")])
def test_bad_schedules_say_what_to_write(text, expect):
    with pytest.raises(ValueError, match=expect):
        parse_schedule(text)


def _config(tmp_path, script: str, num_chunk: int = 3, warmup: int = 0):
    path = tmp_path / "play-tiny-cpu.toml"
    path.write_text(f'kind = "interactive"\npreset = "tiny"\ndevice = "cpu"\nnum_chunk = {num_chunk}\n'
                    f'script = "{script}"\nwarmup_chunks = {warmup}\n[weights]\nrandom_init = 0\n')
    return load_config(path)


@pytest.mark.parametrize(("script", "expect"), [("c3:w", "chunk 3 never happens"), ("", "no key change"),
                                                ("c1f99:w", "frame 0-15")])
def test_the_config_refuses_scripts_that_cannot_play(tmp_path, script, expect):
    with pytest.raises(ExperimentConfigError, match=expect) as info:
        _config(tmp_path, script)
    assert info.value.key == "script"


# -- end to end -------------------------------------------------------------------------------


def test_the_kind_plays_the_server_and_records_what_a_player_sees(tmp_path):
    """Three chunks, w from frame 4 of chunk 0 on, after a one-chunk warm-up world: the server's
    keys are the script's, chunk 2 at the latest moves forward, the change has a latency, every
    frame arrived and was shown in order, and each chunk after the first was generated (partly)
    while the previous one played."""
    pytest.importorskip("aiohttp")
    import torch

    from worldplay.experiments.context import RunContext
    from worldplay.experiments.inputs import InputManifest
    from worldplay.experiments.kinds.interactive import run

    cfg = _config(tmp_path, "c0f4:w", num_chunk=3, warmup=1)
    ctx = RunContext(config=cfg, run_id="test", device=torch.device("cpu"), manifest=InputManifest({}),
                     scratch=tmp_path, video_dir=tmp_path / "videos", progress=False)
    out = run(ctx)
    s = out.summary
    assert s["actions_match"] and s["mismatched_chunks"] == []
    assert [r["chunk"] for r in out.chunk_rows] == [0, 1, 2]
    assert out.chunk_rows[0]["keys_server"] == "" and out.chunk_rows[2]["keys_server"] == "w"
    assert s["frames"] == len(out.frame_rows) == 13 + 16 + 16
    assert [(r["chunk"], r["frame"]) for r in out.frame_rows] == [(0, i) for i in range(13)] + [
        (c, i) for c in (1, 2) for i in range(16)]
    assert all(r["shown_s"] >= r["arrived_s"] for r in out.frame_rows)
    (change,) = s["latency"]
    assert change["chunk"] in (1, 2) and 0 < change["latency_s"] < 120
    assert s["stalls"] == sum(r["stall"] for r in out.frame_rows) == sum(r["stalls"] for r in out.chunk_rows)
    assert s["overlap"]["n"] == 2 and 0 < s["overlap"]["min"] <= s["overlap"]["max"] <= 1
    assert s["sustained_fps"] is not None and 0 < s["sustained_fps"] <= 16.01
