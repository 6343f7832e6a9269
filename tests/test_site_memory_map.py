"""The site's memory map plots the selection the run recorded, not one recomputed here."""

from __future__ import annotations

from worldplay.pose import load_trajectory
from worldplay.site import charts

NUM_CHUNK = 8


def _computed():
    traj = load_trajectory("w-15, right-8, w-8").for_chunks(NUM_CHUNK)
    return charts.memory_rows(traj.viewmats, NUM_CHUNK, seed=0)


def test_rows_rebuilt_from_recorded_clips_match_the_selection():
    computed = _computed()
    clips = {str(r.chunk): r.chosen_start for r in computed if r.chosen_start is not None}
    assert clips, "the pose must engage the retrieval or the test checks nothing"
    rebuilt = charts.memory_rows_from_clips(clips, NUM_CHUNK)
    for got, want in zip(rebuilt, computed, strict=True):
        assert (got.indices, got.context, got.retrieved, got.chosen_start) == \
            (want.indices, want.context, want.retrieved, want.chosen_start)


def test_recorded_indices_are_plotted_as_recorded_even_where_a_recomputation_differs():
    computed = _computed()
    indices = {str(r.chunk): r.indices for r in computed}
    clips = {str(r.chunk): r.chosen_start for r in computed if r.chosen_start is not None}
    # a GPU run that took another clip at chunk 5 (a near-tie decided differently)
    other = next(s for s in range(0, 20 - 12, 4) if s != clips["5"])
    indices["5"] = sorted({*range(8, 20), *range(other, other + 4)})
    clips["5"] = other
    rows = charts.recorded_memory_rows(indices, clips, NUM_CHUNK)
    assert rows[5].chosen_start == other and rows[5].retrieved == list(range(other, other + 4))
    assert rows[5].indices == indices["5"] and rows[4].indices == computed[4].indices


def test_hostile_recorded_values_are_dropped_not_plotted():
    rows = charts.recorded_memory_rows({"1": [0, 1, "x", True, -1, 99], "2": "junk"}, {"1": "3"}, 3)
    assert rows[1].indices == [0, 1] and rows[1].chosen_start is None and rows[2].indices == []
    charts.memory_map(rows, latents_per_chunk=4, title="t")  # draws without error
