"""The one table of legs: the schema, the runner and the site read the same rows."""

from __future__ import annotations

import dataclasses

import pytest

from worldplay.experiments import leg_table, schema
from worldplay.experiments.leg_table import LEG_TABLE, ROWS, leg_row


def test_every_leg_is_one_row_and_the_schema_lists_exactly_them():
    assert len({row.name for row in ROWS}) == len(ROWS)
    assert set(schema.LEGS) == set(LEG_TABLE) and len(schema.LEGS) == len(ROWS)
    assert set(schema.LEG_HELP) == set(LEG_TABLE) and all(schema.LEG_HELP.values())
    assert all(row.kind in leg_table.KINDS_OF_LEG for row in ROWS)


def test_native_rows_have_settings_and_official_rows_none():
    for row in ROWS:
        assert (row.overrides is not None) == row.native, row.name
        assert row.native != row.official, row.name


def test_ranks_follow_the_kind():
    for row in ROWS:
        if row.kind in (leg_table.NATIVE, leg_table.OFFICIAL):
            assert row.ranks == 1, row.name
        else:
            assert row.ranks >= 2, row.name
        assert schema.ranks_of(row.name) == row.ranks
    assert schema.ranks_of("native-sp4") == 4 and schema.ranks_of("native-2gpu") == 2


def test_an_unknown_leg_is_one_clear_error():
    with pytest.raises(ValueError, match="'native-warp' is not a leg; choose one of"):
        leg_row("native-warp")


@pytest.mark.parametrize("name", [row.name for row in ROWS if row.native])
def test_every_native_row_builds_valid_settings_on_the_cpu(name):
    from worldplay.experiments.legs import native_leg
    from worldplay.rollout import RolloutSettings

    leg = native_leg(name, "cpu")
    settings = RolloutSettings(num_chunk=2, **leg.overrides)  # validates every override
    known = {f.name for f in dataclasses.fields(RolloutSettings)}
    assert set(leg.overrides) <= known
    assert str(leg.dtype) == f"torch.{LEG_TABLE[name].dtype}"
    assert leg.memory_cap_gib == LEG_TABLE[name].memory_cap_gib
    assert settings.num_chunk == 2


def test_the_two_gpu_legs_share_their_one_gpu_modes_settings():
    # The site shows a two-GPU leg's speed beside its one-GPU mode's drift: same settings.
    from worldplay.experiments.legs import native_leg

    for row in ROWS:
        if row.kind == leg_table.PIPELINED:
            assert native_leg(row.name, "cuda").overrides == native_leg(row.drift_mode, "cuda").overrides, row.name
            assert row.gpus == "two GPUs"


def test_fast_modes_with_a_drift_experiment_have_a_site_intro():
    for name in ("native-reuse", "native-fp8", "native-reuse-fp8"):
        assert leg_table.intro_of(name).rstrip().endswith("from")
    assert leg_table.intro_of("native-eager") is None and leg_table.intro_of(None) is None
