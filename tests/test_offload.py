"""The DiT in host memory (worldplay.offload): the streamed rollout equals the resident one, the
copy schedule keeps one block ahead without overwriting the running one, and nothing changes
the DiT that was given."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import tiny_pipeline_inputs

from worldplay import offload
from worldplay.offload import PlacedDiT, StreamedBlocks, streamed_indices
from worldplay.pose import trajectory_from_pose_string
from worldplay.rollout import RolloutSettings


def _frames_and_latents(pipe, image, text, **overrides):
    settings = RolloutSettings(num_chunk=6, seed=0, noise_latents=24, **overrides)
    out = list(pipe.rollout(image, text, trajectory_from_pose_string("w-23"), settings))
    return torch.cat([o.frames for o in out]), torch.cat([o.latents for o in out], 2)


@pytest.mark.parametrize("linear_dtype", ["bf16", "fp8"])
def test_streamed_rollout_equals_the_resident_one(linear_dtype):
    """On the CPU there are no streams, but the placement, the packing into flat block buffers,
    the two slots and the prefetch order run as on a GPU: one block streamed, both, or none
    (the DiT's weights "in host memory"), each bit for bit the resident rollout; fp8 too."""
    pipe, image, text = tiny_pipeline_inputs()
    resident = _frames_and_latents(pipe, image, text, linear_dtype=linear_dtype)
    for streamed in (0, 1, 2):
        got = _frames_and_latents(pipe, image, text, linear_dtype=linear_dtype, dit_on_host=True,
                                  streamed_blocks=streamed)
        assert torch.equal(got[0], resident[0]) and torch.equal(got[1], resident[1]), streamed


def test_placement_leaves_the_dit_as_loaded():
    pipe, _, _ = tiny_pipeline_inputs()
    before = {k: v.clone() for k, v in pipe.dit.state_dict().items()}
    ids = {k: id(v) for k, v in pipe.dit.named_parameters()}
    placed = PlacedDiT(pipe.dit, "cpu", streamed=2)
    assert isinstance(placed.model.blocks, StreamedBlocks) and isinstance(pipe.dit.blocks, nn.ModuleList)
    list(placed.model.blocks)  # copies every block into the slots
    assert {k: id(v) for k, v in pipe.dit.named_parameters()} == ids
    assert all(torch.equal(v, before[k]) for k, v in pipe.dit.state_dict().items())
    assert placed.host_nbytes >= sum(p.numel() * p.element_size() for p in pipe.dit.blocks.parameters())


def test_streamed_indices_spread_over_the_depth():
    assert streamed_indices(30, 0) == []
    assert streamed_indices(30, 1) == [29]
    assert streamed_indices(30, 15) == list(range(1, 30, 2))
    assert streamed_indices(30, 4) == [7, 14, 22, 29]
    assert streamed_indices(30, 30) == list(range(30)) == streamed_indices(30, 99)
    with pytest.raises(ValueError, match=">= 0"):
        streamed_indices(30, -1)


class _RecordingStreams:
    """Stands in for the CUDA streams: records every copy (which block into which slot) and
    which slot the compute waited on, in order."""

    def __init__(self, device):
        self.log: list[tuple] = []

    def event(self):
        return object()

    def copy_after_compute(self, dst, src, done):
        dst.copy_(src)
        self.log.append(("copy", dst.data_ptr()))

    def compute_waits(self, done):
        self.log.append(("wait", id(done)))


def test_the_next_streamed_block_is_copied_while_one_runs(monkeypatch):
    """Two passes over 6 blocks with blocks 1, 3 and 5 streamed: each streamed block is copied
    exactly once per pass, before it is asked for (the block before it started its copy), into
    the slot that is not running; the last block's successor is the next pass's first."""
    monkeypatch.setattr(offload, "_Streams", _RecordingStreams)
    blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(6))
    streamed = StreamedBlocks(blocks, [1, 3, 5], torch.device("cpu"))
    slot_of = {s.buffer.data_ptr(): s for s in streamed.slots}
    x = torch.randn(2, 4)
    order = []
    for _ in range(2):
        for i, block in enumerate(streamed):
            running = streamed._running if i in (1, 3, 5) else None
            assert torch.equal(block(x), blocks[i](x))
            order.append((i, [slot_of[p].block for kind, p in streamed.streams.log if kind == "copy"]))
            if running is not None:
                other = next(s for s in streamed.slots if s is not running)
                assert other.block == {1: 3, 3: 5, 5: 1}[i]  # the next one is on its way, elsewhere
            streamed.streams.log.clear()
    copies = [c for _, c in order]
    # pass 1: block 0 starts copying 1; block 1 starts 3; block 2 nothing; block 3 starts 5; block 5 starts 1
    assert copies[:6] == [[1], [3], [], [5], [], [1]]
    assert copies[6:] == [[], [3], [], [5], [], [1]]  # pass 2: block 1 was copied at the end of pass 1


def test_graphs_refuse_streamed_blocks():
    from worldplay.accel import DiTRunner

    pipe, _, _ = tiny_pipeline_inputs()
    placed = PlacedDiT(pipe.dit, "cpu", streamed=1)
    with pytest.raises(ValueError, match="CUDA graphs do not capture streamed blocks"):
        DiTRunner(pipe.dit, "compile+graphs", "sdpa", placed=placed)
