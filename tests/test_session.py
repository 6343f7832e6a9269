"""The session API on the tiny CPU preset: a world stepped chunk by chunk (live controls or a
scripted trajectory) equals ``rollout()``; reset starts over in the same buffers; sessions run
past the preallocated noise and history. Plus the key/label/pose mapping of worldplay.actions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_pipeline_inputs

from worldplay.actions import (
    NUM_LABELS,
    ROTATIONS,
    TRANSLATIONS,
    ChunkPoses,
    Motion,
    Steering,
    advance,
    chunk_poses,
)
from worldplay.memory import MEMORY_SLOTS
from worldplay.models import random_text_states
from worldplay.pose import PoseError, action_labels, trajectory_from_pose_string
from worldplay.rollout import RolloutError, RolloutSettings
from worldplay.session import NoiseStream

# Held keys per chunk and the pose string that says the same (chunk 0 has 3 steps: its first
# latent is the image). Chunk 4 on has 16 memory frames and retrieval chooses a clip.
KEYS = [Motion("w"), Motion("w"), Motion(rotation="right"), Motion("a"), Motion(rotation="up"), Motion("s")]
POSE = "w-7,right-4,a-4,up-4,s-4"


@pytest.fixture(scope="module")
def tiny():
    return tiny_pipeline_inputs()


def _same(a, b) -> bool:
    return torch.equal(a.frames, b.frames) and torch.equal(a.latents, b.latents)


# -- the mapping: no model ------------------------------------------------------------------


def test_every_label_is_the_motion_it_names():
    """Motion -> one latent step -> the official label reader gives back the same label, for all 81."""
    assert len(TRANSLATIONS) * len(ROTATIONS) == NUM_LABELS == 81
    for label in range(NUM_LABELS):
        motion = Motion.from_label(label)
        assert motion.label == label
        step = advance(np.eye(4), motion)
        assert action_labels(np.linalg.inv(np.stack([np.eye(4), step])))[1] == label, motion


def test_held_keys_are_the_pose_string_bit_for_bit():
    steering = Steering()
    chunks = []
    for motion in [*KEYS, Motion(rotation="left"), Motion(rotation="down"), Motion("d")]:
        poses = steering.chunk(motion)
        steering.follow(poses)
        chunks.append(poses)
    traj = trajectory_from_pose_string(POSE + ",left-4,down-4,d-4")
    for i, got in enumerate(chunks):
        want = chunk_poses(traj, i)
        for name in ("c2w", "viewmats", "intrinsics", "actions"):
            assert np.array_equal(getattr(got, name), getattr(want, name)), (i, name)


def test_a_chunk_does_not_move_the_camera_until_it_is_made():
    steering = Steering()
    first = steering.chunk(Motion("w"))
    assert steering.pose is None and np.array_equal(steering.chunk(Motion("w")).c2w, first.c2w)
    steering.follow(first)
    assert np.array_equal(steering.pose, first.c2w[-1])


def test_a_camera_delta_and_a_label_drive_the_camera_too():
    steering = Steering()
    label = Motion("wd", "left+up").label
    by_label = steering.chunk(label)
    assert list(by_label.actions) == [0, label, label, label]
    turn = advance(np.eye(4), Motion(rotation="right"))  # a rigid delta: 3 degrees of yaw
    by_delta = steering.chunk(turn)
    assert list(by_delta.actions) == [0] + [Motion(rotation="right").label] * 3


@pytest.mark.parametrize("bad", [81, -1, True, 2.0, "w"])
def test_bad_labels_are_refused(bad):
    with pytest.raises(PoseError, match="label"):
        Steering().chunk(bad)


def test_bad_motions_deltas_and_poses_are_refused():
    with pytest.raises(PoseError, match="translation 'q' unknown"):
        Motion("q")
    with pytest.raises(PoseError, match="rotation 'spin' unknown"):
        Motion("w", "spin")
    shear = np.eye(4)
    shear[0, 1] = 0.5
    for delta, match in ((shear, "rigid"), (np.full((4, 4), np.nan), "finite"), (np.eye(3), "4x4")):
        with pytest.raises(PoseError, match=match):
            Steering().chunk(delta)
    good = Steering().chunk(Motion("w"))
    with pytest.raises(PoseError, match="actions must be labels"):
        ChunkPoses(good.c2w, good.viewmats, good.intrinsics, np.array([0, 1, 2, 99]))
    with pytest.raises(PoseError, match="viewmats must be float64"):
        ChunkPoses(good.c2w, good.viewmats[:3], good.intrinsics, good.actions)


def test_the_noise_stream_continues_the_generator():
    gen = torch.Generator().manual_seed(5)
    first = torch.randn(1, 2, 6, 1, 1, generator=gen)
    after = torch.randn(1, 2, 6, 1, 1, generator=gen)
    own = torch.Generator().manual_seed(5)
    stream = NoiseStream(torch.randn(1, 2, 6, 1, 1, generator=own), own)  # as a session draws its first block
    assert torch.equal(stream.take(0, 4), first[:, :, :4])
    assert torch.equal(stream.take(4, 4), torch.cat([first[:, :, 4:], after[:, :, :2]], 2))
    assert stream.buffer.shape[2] <= 6 + 4  # the consumed latents were dropped
    with pytest.raises(ValueError, match="dropped"):
        stream.take(0, 4)


# -- sessions on the tiny model ---------------------------------------------------------------


def test_a_session_driven_by_keys_equals_the_rollout_of_the_pose_string(tiny):
    pipe, image, text = tiny
    settings = RolloutSettings(num_chunk=len(KEYS), seed=0, noise_latents=4 * len(KEYS))
    rolled = list(pipe.rollout(image, text, trajectory_from_pose_string(POSE), settings))
    session = pipe.session(image, text, settings)
    stepped = [session.step(motion) for motion in KEYS]
    assert stepped[-1].memory is not None and len(stepped[-1].memory.indices) == MEMORY_SLOTS
    for a, b in zip(stepped, rolled, strict=True):
        assert a.index == b.index and _same(a, b), a.index
        assert (a.memory.indices if a.memory else None) == (b.memory.indices if b.memory else None)


def test_a_session_runs_past_its_noise_and_history(tiny):
    """Preallocated for 2 chunks with 8 noise latents, a session runs 6: its first two chunks are
    the 2-chunk rollout's, the history grows without changing anything (a session preallocated
    for 6 chunks with the same noise gives the same chunks), and the result is reproducible."""
    pipe, image, text = tiny
    short = RolloutSettings(num_chunk=2, seed=0, noise_latents=8)
    rolled = list(pipe.rollout(image, text, trajectory_from_pose_string("w-7"), short))
    session = pipe.session(image, text, short)
    long_run = [session.step(Motion("w" if i < 3 else "d")) for i in range(6)]
    assert session.parts.history.latents.shape[2] == 32  # 8 -> 16 -> 32 latents
    assert all(_same(a, b) for a, b in zip(long_run, rolled, strict=False))
    big = pipe.session(image, text, short, preallocate=6)
    again = [big.step(Motion("w" if i < 3 else "d")) for i in range(6)]
    assert big.parts.history.latents.shape[2] == 24
    assert all(_same(a, b) for a, b in zip(long_run, again, strict=True))
    # Chunks 2.. use the second noise block: not the first block again.
    assert not torch.equal(long_run[2].latents, long_run[0].latents)


def test_reset_starts_over_in_the_same_buffers(tiny):
    pipe, image, text = tiny
    settings = RolloutSettings(num_chunk=3, seed=0, noise_latents=12)
    session = pipe.session(image, text, settings)
    first = [session.step(m) for m in KEYS[:3]]
    buffers = (session.parts.kv.k.data_ptr(), session.parts.decode_state.buffers[0].data_ptr(),
               session.parts.history.latents.data_ptr(), session._text.kv[0][0].data_ptr())
    session.reset()
    assert session.chunk == 0 and session.steering.pose is None
    again = [session.step(m) for m in KEYS[:3]]
    assert all(_same(a, b) for a, b in zip(first, again, strict=True))
    assert buffers == (session.parts.kv.k.data_ptr(), session.parts.decode_state.buffers[0].data_ptr(),
                       session.parts.history.latents.data_ptr(), session._text.kv[0][0].data_ptr())

    # Another image and prompt: the same chunks as a fresh session on them.
    other_image = -image.flip(-1)
    other_text = random_text_states("tiny", 7)
    session.reset(other_image, other_text)
    reset_run = [session.step(m) for m in KEYS[:3]]
    fresh = pipe.session(other_image, other_text, settings)
    assert all(_same(a, fresh.step(m)) for a, m in zip(reset_run, KEYS[:3], strict=True))
    assert not _same(reset_run[1], first[1])

    with pytest.raises(RolloutError, match="another size"):
        session.reset(torch.zeros(3, 32, 32))
    with pytest.raises(RolloutError, match="another shape"):
        session.reset(text_states=text[:, :3])


def test_graphs_persist_across_reset_with_a_new_prompt(monkeypatch, rerun_graph, tiny):
    """CUDA graphs (emulated on the CPU: a replay re-runs what was captured, with the tensors it
    captured) are captured once per session; a reset with another prompt writes it into the
    captured tensors, so the replays equal an eager session on that prompt."""
    import worldplay.accel as accel

    monkeypatch.setattr(accel, "CapturedCall", rerun_graph)
    monkeypatch.setattr(accel.DiTRunner, "_use_graphs", lambda self, device, n_mem: n_mem == MEMORY_SLOTS
                        and "graphs" in self.mode)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    pipe, image, text = tiny
    keys = [Motion("w")] * 3 + [Motion(rotation="left")] * 3
    graphed = pipe.session(image, text, RolloutSettings(num_chunk=6, noise_latents=24, accel="graphs"))
    for m in keys:
        graphed.step(m)
    other = random_text_states("tiny", 8)
    graphed.reset(text_states=other)
    replayed = [graphed.step(m) for m in keys]
    assert pipe.last_accel_stats.captures == 2 and pipe.last_accel_stats.replays > 0
    eager = pipe.session(image, other, RolloutSettings(num_chunk=6, noise_latents=24))
    assert all(torch.equal(a.latents, eager.step(m).latents) for a, m in zip(replayed, keys, strict=True))
