"""The chunked rollout on the tiny preset: memory engaged, retrieval exercised, frame counts."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_pipeline_inputs

from worldplay.memory import MEMORY_SLOTS
from worldplay.models import random_models, random_text_states
from worldplay.pose import PoseError, trajectory_from_pose_string
from worldplay.rollout import RolloutError, RolloutSettings, WorldPlayPipeline

# Walk 19 steps forward, then back: from cur = 28 on, retrieval prefers an old clip over the
# most recent non-context one (spec dit.md 4.4).
POSE = "w-19,s-12"
NUM_CHUNK = 8


@pytest.fixture(scope="module")
def pipeline():
    models = random_models("tiny", 0, device="cpu", dtype=torch.bfloat16)
    return WorldPlayPipeline(models.dit, models.vae, device="cpu", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def outputs(pipeline):
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(3, 64, 96, generator=gen) * 2 - 1
    return list(pipeline.rollout(image, random_text_states("tiny", 0), trajectory_from_pose_string(POSE),
                                 RolloutSettings(num_chunk=NUM_CHUNK, seed=0)))


def test_frame_counts_and_dtypes(outputs):
    assert [o.frames.shape[0] for o in outputs] == [13] + [16] * (NUM_CHUNK - 1)
    assert sum(o.frames.shape[0] for o in outputs) == 16 * NUM_CHUNK - 3
    for o in outputs:
        assert o.frames.dtype == torch.uint8 and o.frames.shape[1:] == (64, 96, 3)
        assert torch.isfinite(o.latents).all() and o.latents.shape == (1, 48, 4, 4, 6)
        assert 0 < o.frames.float().std()  # not a constant image


def test_memory_is_engaged_and_retrieval_chooses(outputs):
    assert outputs[0].memory is None
    for o in outputs[1:4]:
        assert o.memory.indices == list(range(4 * o.index))
    for o in outputs[4:]:
        assert len(o.memory.indices) == MEMORY_SLOTS
        assert o.memory.indices[-12:] == list(range(4 * o.index - 12, 4 * o.index))
    chosen = {o.index: o.memory.chosen_start for o in outputs[4:]}
    # Walking forward, the most recent non-context clip wins; once walking back, an older one.
    assert chosen[5] == 4
    assert any(start < 4 * idx - 16 for idx, start in chosen.items()), chosen


def test_timings_cover_every_stage(outputs):
    assert set(outputs[0].timings_ms) == {"step0", "step1", "step2", "step3", "decode", "dit"}
    assert {"select", "prefill", "dit", "decode"} <= set(outputs[5].timings_ms)
    assert all(v >= 0 for o in outputs for v in o.timings_ms.values())


def test_seeded_rollout_is_reproducible_and_seed_matters(pipeline, outputs):
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(3, 64, 96, generator=gen) * 2 - 1
    text = random_text_states("tiny", 0)
    traj = trajectory_from_pose_string(POSE)
    again = list(pipeline.rollout(image, text, traj, RolloutSettings(num_chunk=2, seed=0)))
    other = list(pipeline.rollout(image, text, traj, RolloutSettings(num_chunk=2, seed=1)))
    assert torch.equal(again[1].latents, outputs[1].latents)
    assert not torch.equal(other[1].latents, outputs[1].latents)


def test_image_latent_is_kept_clean_in_chunk_zero(pipeline):
    """Chunk 0 never updates latent 0 (the encoded image); its first frame is that image's decode."""
    image = torch.zeros(3, 64, 96)
    text = random_text_states("tiny", 0)
    traj = trajectory_from_pose_string("w-3")
    first = next(pipeline.rollout(image, text, traj, RolloutSettings(num_chunk=1, seed=0, image_latent="mode")))
    expected = pipeline.vae.encode_image(image[None].to(torch.bfloat16), mode="mode").to(torch.bfloat16).float()
    assert torch.equal(first.latents[:, :, :1], expected)


def test_short_trajectory_fails_before_model_work(pipeline):
    calls = []
    pipeline.vae.encode_image, original = (lambda *a, **k: calls.append(1)), pipeline.vae.encode_image
    try:
        with pytest.raises(PoseError, match="needs? 36"):
            next(pipeline.rollout(torch.zeros(3, 64, 96), random_text_states("tiny", 0),
                                  trajectory_from_pose_string("w-31"), RolloutSettings(num_chunk=9)))
    finally:
        pipeline.vae.encode_image = original
    assert calls == []


def test_settings_are_validated():
    with pytest.raises(RolloutError, match="num_chunk"):
        RolloutSettings(num_chunk=0)
    with pytest.raises(RolloutError, match="noise_latents"):
        RolloutSettings(num_chunk=70)
    with pytest.raises(ValueError, match="attention backend"):
        RolloutSettings(num_chunk=1, attention_backend="sage")


def _pipeline(num_layers: int) -> WorldPlayPipeline:
    import dataclasses

    from worldplay.checkpoint import random_init_
    from worldplay.config import DIT_PRESETS
    from worldplay.nn.dit import WanDiT

    models = random_models("tiny", 0, device="cpu", dtype=torch.float32)
    dit = WanDiT(dataclasses.replace(DIT_PRESETS["tiny"], num_layers=num_layers), worldplay=True).eval()
    random_init_(dit, 3)
    return WorldPlayPipeline(dit, models.vae, device="cpu", dtype=torch.float32)


def _both_modes(pipe: WorldPlayPipeline):
    image = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    traj = trajectory_from_pose_string("w-4,right-13,left-14")  # retrieval picks clip 4 at chunk 7
    out = {}
    for mode in ("reprefill", "reuse"):
        settings = RolloutSettings(num_chunk=8, official_rope_tables=False, memory_mode=mode)
        out[mode] = list(pipe.rollout(image, random_text_states("tiny", 0), traj, settings))
    return out


def test_reuse_mode_is_exact_when_keys_do_not_depend_on_context():
    """With one layer a frame's keys/values depend only on the frame itself, so moving them
    between slots and re-rotating them to the new rank must equal recomputing them: this checks
    the slot bookkeeping and the RoPE re-rotation of the reuse mode."""
    out = _both_modes(_pipeline(num_layers=1))
    for a, b in zip(out["reprefill"], out["reuse"], strict=True):
        assert ((a.latents - b.latents).norm() / a.latents.norm()).item() <= 1e-5, a.index


def test_reuse_mode_is_an_approximation_with_more_layers():
    """With depth, memory keys depend on the context they were computed in: reuse deviates from
    reprefill from chunk 2 on (the first chunk that reuses), and the deviation stays bounded."""
    out = _both_modes(_pipeline(num_layers=2))
    errs = [((a.latents - b.latents).norm() / a.latents.norm()).item()
            for a, b in zip(out["reprefill"], out["reuse"], strict=True)]
    assert errs[0] == 0 and errs[1] == 0
    assert all(1e-4 < e < 0.5 for e in errs[2:]), errs
    assert [o.memory.indices for o in out["reuse"][1:]] == [o.memory.indices for o in out["reprefill"][1:]]


@pytest.mark.parametrize("extra", [{}, {"memory_mode": "reuse"}, {"linear_dtype": "fp8"}],
                         ids=["reprefill", "reuse", "fp8"])
def test_compiled_blocks_match_eager(extra):
    """accel='compile' (inductor on the CPU here): the warm-up chunks run eagerly and are
    identical; the steady chunks (16 memory frames, compiled blocks with the K/V store and the
    attention as an eager island) differ only by bf16 rounding of the fused kernels."""
    pipe, image, text = tiny_pipeline_inputs()
    traj = trajectory_from_pose_string("w-23")
    eager = list(pipe.rollout(image, text, traj, RolloutSettings(num_chunk=6, noise_latents=24, **extra)))
    compiled = list(pipe.rollout(image, text, traj, RolloutSettings(num_chunk=6, noise_latents=24, accel="compile",
                                                                    **extra)))
    stats = pipe.last_accel_stats
    assert stats.compiled_calls > 0 and stats.recompiles == 0
    errs = [((c.latents - e.latents).norm() / e.latents.norm()).item() for c, e in zip(compiled, eager, strict=True)]
    assert errs[:4] == [0.0] * 4
    assert 0 < max(errs[4:]) < (0.03 if extra.get("linear_dtype") == "fp8" else 0.015)


@pytest.mark.parametrize("memory_mode", ["reprefill", "reuse"])
def test_graph_replays_refresh_their_static_inputs(monkeypatch, memory_mode, rerun_graph):
    """The CUDA-graph bookkeeping (static copies of every input, one shared output) on the CPU:
    with replays that re-run the captured function, accel='graphs' equals eager exactly."""
    import worldplay.accel as accel

    monkeypatch.setattr(accel, "CapturedCall", rerun_graph)
    monkeypatch.setattr(accel.DiTRunner, "_use_graphs", lambda self, device, n_mem: n_mem == MEMORY_SLOTS
                        and "graphs" in self.mode)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    pipe, image, text = tiny_pipeline_inputs()
    traj = trajectory_from_pose_string("w-3,right-12,left-12")
    out = {}
    for mode in ("eager", "graphs"):
        settings = RolloutSettings(num_chunk=7, noise_latents=28, accel=mode, memory_mode=memory_mode)
        out[mode] = list(pipe.rollout(image, text, traj, settings))
    stats = pipe.last_accel_stats
    assert stats.captures == 2 and stats.replays > 0
    for a, b in zip(out["graphs"], out["eager"], strict=True):
        assert torch.equal(a.latents, b.latents)


def _plain_attributes(module: torch.nn.Module) -> dict:
    """A module's own attributes (not its parameters, buffers or children): values of plain
    types, the identity of anything else (a speed-up that stores a compiled function, a cache or
    a flag on a shared model shows here)."""
    plain = (bool, int, float, str, type(None), torch.dtype, tuple)
    return {k: v if isinstance(v, plain) else id(v) for k, v in vars(module).items()
            if k not in ("_parameters", "_buffers", "_modules")}


def _model_state(model: torch.nn.Module):
    modules = {name: (type(m), _plain_attributes(m)) for name, m in model.named_modules()}
    tensors = {name: (id(t), t.dtype, t.device, t.stride())
               for name, t in [*model.named_parameters(), *model.named_buffers()]}
    return modules, tensors, {k: v.clone() for k, v in model.state_dict().items()}


def test_fast_settings_leave_the_models_as_loaded(monkeypatch, rerun_graph):
    """Every speed-up of a fastest-style rollout (fp8 linears, the channels-last decoder, CUDA
    graphs emulated on the CPU, fused kernels, reuse, float32 RoPE tables) lives in the runners:
    afterwards the shared models have the same modules, attributes, parameter objects, dtypes,
    strides and values, and a default rollout on them equals one on freshly built models, bit
    for bit. (Compilation is skipped here: ``torch.compile`` is the identity.)"""
    import worldplay.accel as accel

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    monkeypatch.setattr(accel, "CapturedCall", rerun_graph)
    monkeypatch.setattr(accel.DiTRunner, "_use_graphs", lambda self, device, n_mem: n_mem == MEMORY_SLOTS
                        and "graphs" in self.mode)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    pipe, image, text = tiny_pipeline_inputs()
    traj = trajectory_from_pose_string("w-23")
    before = {name: _model_state(m) for name, m in (("dit", pipe.dit), ("vae", pipe.vae))}
    fast = RolloutSettings(num_chunk=6, noise_latents=24, accel="compile+graphs", fast_decode=True,
                           linear_dtype="fp8", fused_kernels=True, memory_mode="reuse", official_rope_tables=False)
    assert len(list(pipe.rollout(image, text, traj, fast))) == 6
    assert pipe.last_accel_stats.captures == 2  # the runner did take the graph path
    for name, model in (("dit", pipe.dit), ("vae", pipe.vae)):
        modules, tensors, values = _model_state(model)
        assert modules == before[name][0], name
        assert tensors == before[name][1], name
        assert values.keys() == before[name][2].keys() and all(
            torch.equal(v, before[name][2][k]) for k, v in values.items()), name

    default = RolloutSettings(num_chunk=6, noise_latents=24)
    after_fast = list(pipe.rollout(image, text, traj, default))
    fresh, _, _ = tiny_pipeline_inputs()
    for a, b in zip(after_fast, fresh.rollout(image, text, traj, default), strict=True):
        assert torch.equal(a.frames, b.frames) and torch.equal(a.latents, b.latents), a.index
