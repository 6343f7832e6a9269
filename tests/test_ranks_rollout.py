"""A session over 2, 3 and 4 ranks (gloo processes on the CPU) gives the one-process rollout's
frames, latents and memory selections; the bytes it sent are the counted ones; a rank that fails
or dies ends the others with its error; ranks that disagree are refused.

The floors, measured: bf16 is bit-equal (frames, latents) at 2, 3 and 4 ranks. float32 latents
are bit-equal too; its frames may differ by one uint8 level at a few pixels: oneDNN picks
another convolution kernel for a rank's narrower band of columns (|delta| ~5e-7 before the
rounding to uint8, one float32 ulp or a few), which bf16's coarser rounding absorbs.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import ranks_helpers
import torch

from worldplay.models import random_text_states
from worldplay.pose import trajectory_from_pose_string
from worldplay.ranks.spawn import MultiRankPipeline, RanksFailed
from worldplay.rollout import RolloutSettings, WorldPlayPipeline

POSE = "w-7,right-5,s-7"
IMAGE = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(2)) * 2 - 1
TEXT = random_text_states("tiny", 0)


def _settings(num_chunk: int, dtype: torch.dtype) -> RolloutSettings:
    return RolloutSettings(num_chunk=num_chunk, seed=1, noise_latents=4 * num_chunk,
                           official_rope_tables=dtype != torch.float32)


def _one_process(builder, dtype, num_chunk):
    models = builder(dtype, "cpu")
    pipe = WorldPlayPipeline(models.dit, models.vae, device="cpu", dtype=dtype)
    return list(pipe.rollout(IMAGE, TEXT, trajectory_from_pose_string(POSE), _settings(num_chunk, dtype)))


def _ranks(builder, dtype, num_chunk, ranks, transport="direct"):
    pipe = MultiRankPipeline(functools.partial(builder, dtype), ranks=ranks, devices=("cpu",) * ranks, dtype=dtype,
                             transport=transport)
    return pipe, list(pipe.rollout(IMAGE, TEXT, trajectory_from_pose_string(POSE), _settings(num_chunk, dtype)))


def _memory(chunk):
    return list(chunk.memory.indices) if chunk.memory else None


@pytest.mark.slow
def test_two_ranks_equal_one_process_and_send_the_counted_bytes():
    """5 chunks (the memory full from chunk 4, retrieval engaged), bf16: bit-equal."""
    from worldplay.ranks.traffic import chunk_traffic

    ref = _one_process(ranks_helpers.tiny, torch.bfloat16, 5)
    pipe, got = _ranks(ranks_helpers.tiny, torch.bfloat16, 5, 2)
    assert [c.index for c in got] == list(range(5))
    for a, b in zip(got, ref, strict=True):
        assert np.array_equal(a.frames.numpy(), b.frames.numpy())
        assert torch.equal(a.latents, b.latents)
        assert _memory(a) == _memory(b)
        assert a.timings_ms["dit"] > 0 and a.timings_ms["decode"] > 0
    assert set(pipe.last_peaks) == {"rank0 (cpu)", "rank1 (cpu)"}
    # What gloo moved, against the count of worldplay.ranks.traffic: chunk 4 is a steady chunk
    # (16 memory latents); the earlier ones prefill 0, 4, 8, 12, and chunk 0 decodes 13 frames.
    counted = chunk_traffic("tiny", 64, 96, 2, rank=0, text_tokens=TEXT.shape[1])
    sent = pipe.last_traffic["rank0"]
    # DiT: the prefill scales with the memory latents (0+4+8+12+16 = 40 of 16), the steps with the chunks
    assert sent["dit"] == counted["dit_prefill"] * 40 // 16 + 5 * counted["dit_steps"]
    assert sent["decode"] > 4 * counted["decode"]


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [3, 4])
def test_three_and_four_ranks_equal_one_process(ranks):
    """12 heads (tiny's 2 do not split over 3 or 4); 6 tokens per frame and 6 latent columns:
    uneven pieces at 4 ranks (2, 2, 1, 1)."""
    ref = _one_process(ranks_helpers.twelve_heads, torch.bfloat16, 3)
    _, got = _ranks(ranks_helpers.twelve_heads, torch.bfloat16, 3, ranks)
    for a, b in zip(got, ref, strict=True):
        assert np.array_equal(a.frames.numpy(), b.frames.numpy())
        assert torch.equal(a.latents, b.latents)
        assert _memory(a) == _memory(b)


def test_host_staged_ranks_equal_one_process():
    """transport="host" (how two ranks share one GPU) is the same arithmetic: bit-equal in bf16."""
    ref = _one_process(ranks_helpers.tiny, torch.bfloat16, 2)
    _, got = _ranks(ranks_helpers.tiny, torch.bfloat16, 2, 2, transport="host")
    for a, b in zip(got, ref, strict=True):
        assert np.array_equal(a.frames.numpy(), b.frames.numpy())
        assert torch.equal(a.latents, b.latents)


@pytest.mark.parametrize(("devices", "transport", "message"), [
    (("cuda:0", "cuda:0"), "direct", r"the ranks need one GPU each or the CPU each, got \['cuda:0', 'cuda:0'\] "
                                     r"\(transport='host' lets them share one GPU"),
    (("cuda:0", "cpu"), "host", "the ranks need one GPU each or the CPU each"),
    (("cpu", "cpu"), "tcp", r"transport 'tcp' unknown; choose one of \['direct', 'host'\]"),
])
def test_devices_the_ranks_cannot_share_are_refused(devices, transport, message):
    from worldplay.rollout import RolloutError

    with pytest.raises(RolloutError, match=message):
        MultiRankPipeline(ranks_helpers.tiny, ranks=2, devices=devices, transport=transport)


def test_host_staged_ranks_on_a_gpu_refuse_cuda_graphs_before_starting():
    """No process starts (the check is the stream's first step), so no GPU is needed here."""
    from worldplay.rollout import RolloutError

    pipe = MultiRankPipeline(ranks_helpers.tiny, ranks=2, devices=("cuda:0", "cuda:0"), transport="host")
    settings = RolloutSettings(num_chunk=1, accel="compile+graphs")
    with pytest.raises(RolloutError, match="a CUDA graph cannot capture the host-staged exchanges .*use accel='compile'"):
        next(pipe.rollout(IMAGE, TEXT, trajectory_from_pose_string(POSE), settings))


@pytest.mark.slow
def test_float32_over_two_ranks_is_within_its_floor():
    ref = _one_process(ranks_helpers.tiny, torch.float32, 3)
    _, got = _ranks(ranks_helpers.tiny, torch.float32, 3, 2)
    for a, b in zip(got, ref, strict=True):
        assert torch.allclose(a.latents, b.latents, rtol=0, atol=1e-5)
        diff = (a.frames.int() - b.frames.int()).abs()
        assert diff.max() <= 1 and diff.float().mean() < 1e-3


def test_a_rank_that_fails_ends_the_others_with_its_error():
    """Rank 1 cannot load its weights while rank 0 waits for it inside a collective: the stream
    raises rank 1's error at once (not after a collective timeout)."""
    import time

    t0 = time.perf_counter()
    with pytest.raises(RanksFailed, match="rank 1 failed: FileNotFoundError: no weights at /nowhere on rank 1"):
        _ranks(ranks_helpers.fails_on_rank_one, torch.bfloat16, 2, 2)
    assert time.perf_counter() - t0 < 120


@pytest.mark.slow
def test_a_rank_that_dies_mid_rollout_is_named():
    with pytest.raises(RanksFailed, match="rank 1"):
        _ranks(ranks_helpers.dies_on_rank_one, torch.bfloat16, 3, 2)


def test_ranks_with_other_weights_are_refused():
    with pytest.raises(RanksFailed, match="rank 1 runs with weights = .* but rank 0 with .*; start every rank with "
                                          "the same arguments, inputs and weights"):
        _ranks(ranks_helpers.other_weights_on_rank_one, torch.bfloat16, 1, 2)
