"""worldplay.ranks without a model: the splits, the exchanges against their one-rank meaning
(2 and 3 gloo processes), the launcher's environment, the refusals, the counted traffic."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from ranks_helpers import exchange_checks

from worldplay.ranks import RankGroup
from worldplay.ranks.launch import RankError, check_agreement, from_environment
from worldplay.ranks.sequence import check_heads
from worldplay.ranks.split import balanced_split, starts


@settings(max_examples=80, deadline=None)
@given(total=st.integers(1, 5000), parts=st.integers(1, 64))
def test_balanced_split(total, parts):
    if total < parts:
        with pytest.raises(ValueError):
            balanced_split(total, parts)
        return
    sizes = balanced_split(total, parts)
    assert len(sizes) == parts and sum(sizes) == total and min(sizes) >= 1
    assert max(sizes) - min(sizes) <= 1 and list(sizes) == sorted(sizes, reverse=True)
    assert starts(sizes)[-1] == total


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("size", [2, 3])
def test_exchanges_equal_their_one_rank_meaning(size):
    """to_heads/to_tokens/gather of the DiT's tokens and the VAE's halo and column gather, with
    uneven pieces (7 tokens per frame, 7 latent columns)."""
    mp.start_processes(exchange_checks, args=(size, _port(), None), nprocs=size, start_method="spawn")


def test_host_staged_exchanges_equal_the_direct_ones():
    """transport="host" (ranks sharing a GPU: gloo over host copies) gives the same exchanges."""
    mp.start_processes(exchange_checks, args=(3, _port(), None, "host"), nprocs=3, start_method="spawn")


@pytest.mark.slow
def test_host_staged_exchanges_inside_a_compiled_function():
    """As the one-GPU leg calls them: from a torch.compile'd block (each exchange a graph break)."""
    mp.start_processes(exchange_checks, args=(2, _port(), None, "host", True), nprocs=2, start_method="spawn")


def test_an_unknown_transport_is_refused():
    from worldplay.ranks.launch import join

    with pytest.raises(RankError, match="transport 'pigeon' unknown; choose one of \\['direct', 'host'\\]"):
        join(0, 2, torch.device("cpu"), transport="pigeon")


def test_heads_that_do_not_split_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="24 attention heads do not split over 5 ranks; .*1, 2, 3, 4, 6, 8, 12, 24"):
        check_heads(24, 5)
    check_heads(24, 6)


def test_a_session_refuses_ranks_its_model_cannot_split():
    """The tiny preset's 2 heads over 3 ranks: one line before any buffer is made."""
    from conftest import tiny_pipeline_inputs

    from worldplay.rollout import RolloutError, RolloutSettings

    pipe, image, text = tiny_pipeline_inputs()
    pipe.ranks = RankGroup(0, 3, "cpu", process_group=object())  # never reached: the check comes first
    with pytest.raises(RolloutError, match="2 attention heads do not split over 3 ranks"):
        pipe.session(image, text, RolloutSettings(num_chunk=1, noise_latents=4))


def test_a_grid_narrower_than_the_ranks_is_refused():
    group = RankGroup(0, 8, "cpu", process_group=object())
    with pytest.raises(ValueError, match="6-column latent grid cannot be decoded by 8 ranks"):
        group.column_shards(6)
    with pytest.raises(ValueError, match="6 tokens per latent frame cannot be shared by 8 ranks"):
        group.token_shards(6, 24)


def test_the_launcher_environment():
    assert from_environment({}) is None
    assert from_environment({"WORLD_SIZE": "1", "RANK": "0"}) is None
    got = from_environment({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (got.rank, got.size, got.local_rank) == (3, 4, 1)
    with pytest.raises(RankError, match="WORLD_SIZE='two' is not a rank number"):
        from_environment({"WORLD_SIZE": "two"})
    with pytest.raises(RankError, match="RANK=4 is not one of the 4 ranks"):
        from_environment({"WORLD_SIZE": "4", "RANK": "4"})


def test_one_rank_is_the_same_code_with_identity_collectives():
    group = RankGroup()
    t = torch.arange(6.0)
    assert group.all_to_all(t, [6], [6], "x") is t and group.gather_along(t, 0, (6,), "x") is t
    assert group.exchange_edges(t, t, "x") == (None, None)
    assert group.all_gather_object({"a": 1}) == [{"a": 1}] and group.broadcast_object(3) == 3
    assert group.token_shards(880, 24) is None and group.column_shards(80) is None
    check_agreement(group, {"a": 1})
    assert not group.traffic


def test_counted_traffic_of_the_real_model():
    """The count at 704x1280 over two ranks (worldplay.ranks.traffic, meta tensors) against the
    Ulysses arithmetic: per layer q, k, v in (one branch) and both branches' output back, half of
    each rank's bytes to the other rank; the prefill's last layer only k and v."""
    from worldplay.ranks.traffic import chunk_traffic

    got = chunk_traffic("wan5b", 704, 1280, 2)
    per_frame, width, layers, bf16 = 880, 3072, 30, 2
    local = per_frame // 2

    def attention_bytes(frames, units):
        return units * frames * local * width * bf16 // 2

    prefill = (layers - 1) * attention_bytes(16, 5) + attention_bytes(16, 2)
    # each step: 30 layers x (3 in + 2 out), and the output gather: 4 frames x 440 tokens x 192 values
    steps = 4 * (layers * attention_bytes(4, 5) + 4 * local * 192 * bf16)
    assert got["dit_prefill"] == prefill
    assert got["dit_steps"] == steps
    assert 0 < got["decode"] < got["dit_steps"] / 20


def test_the_official_leg_at_world_size_two_is_launched_as_torchrun_would():
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* per rank, rank 0's chunks, each rank's peaks; a rank
    that fails is named (the official code itself runs on the GPU machines only)."""
    from types import SimpleNamespace

    from ranks_helpers import FakeOfficialRunner

    from worldplay.experiments.official_leg import ranked_rollout
    from worldplay.ranks.spawn import RanksFailed

    cfg = SimpleNamespace(num_chunk=3)
    peaks: dict = {}
    chunks = list(ranked_rollout(Path("official"), Path("w"), cfg, Path("i.png"), torch.zeros(1, 2, 3), None,
                                 ranks=2, compile=False, peaks_out=peaks, devices=("cpu", "cpu"),
                                 runner_factory=FakeOfficialRunner))
    assert [c.index for c in chunks] == [0, 1, 2] and all(c.timings_ms["ranks_sum"] == 1.0 for c in chunks)
    assert set(peaks) == {"rank0 (cpu)", "rank1 (cpu)"}
    with pytest.raises(RanksFailed, match="rank 1: RuntimeError: the official code failed on rank 1"):
        list(ranked_rollout(Path("fail"), Path("w"), cfg, Path("i.png"), torch.zeros(1, 2, 3), None, ranks=2,
                            compile=False, devices=("cpu", "cpu"), runner_factory=FakeOfficialRunner))


def test_the_memory_plan_of_one_gpu_of_several():
    """Weights on every rank; the memory K/V by heads; the decoder's history by columns."""
    from worldplay.memory_plan import plan_memory
    from worldplay.rollout import RolloutSettings

    settings = RolloutSettings(num_chunk=4, noise_latents=16)
    one, two = (plan_memory("tiny", 64, 96, settings, device_type="cpu", ranks=n) for n in (1, 2))
    items = [{i.name.split(" (")[0]: i.nbytes for i in p.items} for p in (one, two)]
    assert items[1]["memory K/V"] * 2 == items[0]["memory K/V"]
    assert items[1]["DiT weights"] == items[0]["DiT weights"]
    assert items[0]["decode state"] / 2 < items[1]["decode state"] < items[0]["decode state"]  # + the halo columns
    assert two.peak_bytes < one.peak_bytes
