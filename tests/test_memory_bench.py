"""What the bench records about memory: the memory legs, their caps and plans, a leg that does
not fit its cap, and each rank's peaks on two devices."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from worldplay.experiments.legs import memory_cap, native_leg
from worldplay.experiments.schema import LEG_HELP, NATIVE_LEGS, BenchConfig, WeightsSpec

MEMORY_LEGS = ("native-fastest-lean", "native-kv-fp8", "native-lowvram-24", "native-lowvram-24-exact",
               "native-lowvram-16")


@pytest.mark.parametrize("name", MEMORY_LEGS)
def test_memory_legs_are_legs_with_help_caps_and_settings(name):
    assert name in NATIVE_LEGS and LEG_HELP[name]
    for device in ("cuda", "cpu"):
        leg = native_leg(name, device)
        described = leg.describe(_config(["native-fastest"]))
        assert described["memory_cap_gib"] == {"native-fastest-lean": 32.0, "native-kv-fp8": None,
                                               "native-lowvram-24": 22.0, "native-lowvram-24-exact": 22.0,
                                               "native-lowvram-16": 14.0}[name]


def _config(legs, name="b-tiny-cpu"):
    return BenchConfig(name=name, kind="bench", preset="tiny", device="cpu", weights=WeightsSpec(random_init=0),
                       resolution=(64, 96), num_chunk=5, legs=tuple(legs), pose="w-19", warmup_chunks=4)


def test_a_leg_over_its_cap_is_recorded_and_the_bench_goes_on(monkeypatch, tmp_path):
    """A capped leg that runs out of memory is a result ("out of memory" with the message), not
    the end of the bench: the other legs run, and every leg records its memory plan."""
    from worldplay.experiments import legs as legs_module
    from worldplay.experiments.context import RunContext
    from worldplay.experiments.inputs import InputManifest
    from worldplay.experiments.kinds import bench

    real = legs_module.native_rollout

    def fails_when_capped(models, leg, *args, **kwargs):
        if leg.memory_cap_gib is not None:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        yield from real(models, leg, *args, **kwargs)

    monkeypatch.setattr(bench, "native_rollout", fails_when_capped)
    cfg = _config(["native-fastest", "native-lowvram-16"])
    manifest = InputManifest.load(Path(__file__).resolve().parents[1] / "experiments" / "inputs.toml")
    ctx = RunContext(config=cfg, run_id="test", device=torch.device("cpu"), manifest=manifest, scratch=tmp_path,
                     video_dir=tmp_path / "videos", progress=False)
    out = bench.run(ctx)
    legs = out.summary["legs"]
    assert legs["native-fastest"]["status"] == "ok" and legs["native-fastest"]["steady_ms"]
    assert legs["native-lowvram-16"]["status"] == "out of memory"
    assert legs["native-lowvram-16"]["error"].startswith("under the 14.0 GiB cap: CUDA out of memory")
    assert {r["leg"] for r in out.chunk_rows} == {"native-fastest"}
    for leg in legs.values():
        assert leg["memory_plan"]["predicted_peak_allocated_gib"] > 0


def test_memory_cap_sets_and_restores_the_fraction(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)  # a plain "cuda" names the current GPU
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: type("P", (), {"total_memory": (140 if d == 3 else 80) * 2**30})())
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda f, d=None: calls.append((round(f, 4), d)))
    with memory_cap(torch.device("cuda"), 14.0):
        assert calls == [(0.1, 3)]
    assert calls == [(0.1, 3), (1.0, 3)]
    with memory_cap(torch.device("cuda", 1), 16.0):  # an explicit index is used as given
        assert calls[-1] == (0.2, 1)
    assert calls[-1] == (1.0, 1)
    calls.clear()
    with memory_cap(torch.device("cuda"), None), memory_cap(torch.device("cpu"), 14.0):
        pass
    assert calls == []


def test_two_device_rollout_reports_each_ranks_peaks():
    """The pipelined path (two CPU processes joined by gloo) hands back both ranks' peaks."""
    from worldplay.models import random_text_states
    from worldplay.pipelined import TwoDevicePipeline, random_builder
    from worldplay.pose import trajectory_from_pose_string
    from worldplay.rollout import RolloutSettings

    pipe = TwoDevicePipeline(random_builder("tiny", 0), devices=("cpu", "cpu"))
    image = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(2)) * 2 - 1
    chunks = list(pipe.rollout(image, random_text_states("tiny", 0), trajectory_from_pose_string("w-7"),
                               RolloutSettings(num_chunk=2, seed=0, noise_latents=8), keep_frames=False))
    assert len(chunks) == 2
    assert set(pipe.last_peaks) == {"rank0 (DiT)", "rank1 (decode)"}
    assert all(peak["host_peak_rss_mib"] > 0 for peak in pipe.last_peaks.values())
