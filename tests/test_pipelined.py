"""The two-device pipeline (DiT on one device, VAE decode on the other) returns the one-device
rollout's frames and latents exactly; run here as two CPU processes joined by gloo."""

import numpy as np
import torch

from worldplay.models import random_models, random_text_states
from worldplay.pipelined import TwoDevicePipeline, random_builder
from worldplay.pose import trajectory_from_pose_string
from worldplay.rollout import RolloutSettings, WorldPlayPipeline


def test_pipelined_rollout_equals_the_one_device_rollout():
    settings = RolloutSettings(num_chunk=5, seed=1, noise_latents=20)
    traj = trajectory_from_pose_string("w-7,right-5,s-7")
    image = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(2)) * 2 - 1
    text = random_text_states("tiny", 0)
    models = random_models("tiny", 0, device="cpu")
    ref = list(WorldPlayPipeline(models.dit, models.vae, device="cpu").rollout(image, text, traj, settings))

    pipe = TwoDevicePipeline(random_builder("tiny", 0), devices=("cpu", "cpu"))
    chunks = list(pipe.rollout(image, text, traj, settings))
    accel = pipe.last_accel_stats.to_dict()

    assert [c.index for c in chunks] == list(range(5))
    for got, want in zip(chunks, ref, strict=True):
        assert np.array_equal(got.frames, want.frames.numpy())
        assert torch.equal(got.latents, want.latents)
        assert (list(got.memory.indices) if got.memory else None) == (list(want.memory.indices) if want.memory else None)
        assert got.timings_ms["decode"] > 0 and got.timings_ms["dit"] > 0
        assert got.clock_s["ready"] >= got.clock_s["sent"]  # frames are ready after their latents were sent
    for c in chunks[1:]:
        t = c.timings_ms
        assert t["pipelined"] == max(t["interval"], t["sent_interval"]) > 0
        assert t["recv_wait"] >= 0
    assert accel["eager_calls"] > 0


def _broken_builder(device):
    raise FileNotFoundError("no weights at /nowhere (test)")


def test_a_failing_worker_is_reported_with_its_error():
    import pytest

    from worldplay.pipelined import PipelineError

    traj = trajectory_from_pose_string("w-7")
    with pytest.raises(PipelineError, match="no weights at /nowhere"):
        list(TwoDevicePipeline(_broken_builder, devices=("cpu", "cpu")).rollout(
            torch.zeros(3, 64, 96), random_text_states("tiny", 0), traj, RolloutSettings(num_chunk=2, noise_latents=8)))


def test_the_two_device_rollout_is_a_stream(monkeypatch):
    """Chunks come back as ``ChunkOutput`` records while the workers still run, through a queue
    (no temporary folder), and closing the stream early ends the workers."""
    import multiprocessing
    import tempfile

    from worldplay.rollout import ChunkOutput

    def no_temp_folder(*args, **kwargs):
        raise AssertionError("the two-device rollout made a temporary folder")

    monkeypatch.setattr(tempfile, "TemporaryDirectory", no_temp_folder)
    before = set(multiprocessing.active_children())
    pipe = TwoDevicePipeline(random_builder("tiny", 0), devices=("cpu", "cpu"))
    stream = pipe.rollout(torch.zeros(3, 64, 96), random_text_states("tiny", 0), trajectory_from_pose_string("w-19"),
                          RolloutSettings(num_chunk=5, noise_latents=20))
    first = next(stream)
    assert isinstance(first, ChunkOutput) and first.index == 0 and first.frames.shape == (13, 64, 96, 3)
    # The workers cannot have finished: the later chunks' frames wait for this process to read them.
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 2
    stream.close()
    assert not any(p.is_alive() for p in workers)
