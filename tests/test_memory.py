"""HY-WorldPlay additions on the backbone: zero-init equivalence, PRoPE, the in-place memory K/V."""

from __future__ import annotations

import pytest
import torch

from worldplay.checkpoint import random_init_
from worldplay.config import DIT_PRESETS
from worldplay.memory import MEMORY_SLOTS, MemoryKV, memory_positions
from worldplay.nn.dit import WanDiT
from worldplay.nn.prope import PRoPE, apply_per_frame

CFG = DIT_PRESETS["tiny"]
H, W = 4, 6  # latent grid -> 2 x 3 = 6 tokens per frame
S = (H // 2) * (W // 2)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def random_cameras(frames: int, gen: torch.Generator):
    """Random rigid world-to-camera matrices and normalised intrinsics."""
    q = torch.linalg.qr(torch.randn(frames, 3, 3, generator=gen, dtype=torch.float64)).Q
    q = q * torch.sign(torch.linalg.det(q))[:, None, None]
    w = torch.eye(4, dtype=torch.float64).repeat(frames, 1, 1)
    w[:, :3, :3] = q
    w[:, :3, 3] = torch.randn(frames, 3, generator=gen, dtype=torch.float64)
    k = torch.zeros(frames, 3, 3, dtype=torch.float64)
    k[:, 0, 0], k[:, 1, 1], k[:, 0, 2], k[:, 1, 2], k[:, 2, 2] = 0.505, 0.898, 0.5, 0.5, 1.0
    return w[None].float(), k[None].float()


@pytest.fixture(scope="module")
def models():
    hy = WanDiT(CFG, worldplay=True).eval()
    random_init_(hy, seed=5)
    return hy


def _chunk_inputs(frames: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 48, frames, H, W, generator=gen)
    text = torch.randn(1, 5, CFG.text_dim, generator=gen)
    actions = torch.randint(0, 81, (1, frames), generator=gen).float()
    viewmats, ks = random_cameras(frames, gen)
    return x, text, actions, viewmats, ks


def test_zero_initialised_extras_equal_the_backbone(models):
    hy = WanDiT(CFG, worldplay=True).eval()
    hy.load_state_dict(models.state_dict())
    hy.zero_worldplay_extras()
    base = WanDiT(CFG).eval()
    base.load_state_dict({k: v for k, v in hy.state_dict().items() if k in base.state_dict()})
    x, text, actions, viewmats, ks = _chunk_inputs(4)
    t = torch.tensor([[14.0, 1000.0, 1000.0, 1000.0]])
    with torch.no_grad():
        want = base(x, t, text)
        got = hy(x, t, text, actions=actions, viewmats=viewmats, intrinsics=ks)
        trained = models(x, t, text, actions=actions, viewmats=viewmats, intrinsics=ks)
    assert torch.equal(got, want)
    assert rel_err(trained, want) > 1e-2  # non-zero extras do change the output


def test_prope_logits_depend_only_on_relative_cameras():
    """q^T P_i P_j^-1 k is invariant to moving the world frame (the point of PRoPE)."""
    gen = torch.Generator().manual_seed(1)
    w, k = random_cameras(3, gen)
    shift, _ = random_cameras(1, gen)  # a rigid world change: W -> W @ G
    q = torch.randn(1, 3, 2, 8, generator=gen)  # one token per frame, 2 heads, d=8
    kk = torch.randn(1, 3, 2, 8, generator=gen)

    def logits(viewmats):
        p = PRoPE.from_cameras(viewmats.double(), k.double(), torch.float64)
        qq = apply_per_frame(q.double(), p.q)
        ky = apply_per_frame(kk.double(), p.kv)
        return torch.einsum("bihd,bjhd->bhij", qq, ky)

    moved = w.double() @ torch.linalg.inv(shift.double())
    assert torch.allclose(logits(w), logits(moved), atol=1e-9)
    # And the output transform undoes the value transform for a frame attending to itself.
    p = PRoPE.from_cameras(w.double(), k.double(), torch.float64)
    v = torch.randn(1, 3, 2, 8, dtype=torch.float64, generator=gen)
    assert torch.allclose(apply_per_frame(apply_per_frame(v, p.kv), p.o), v, atol=1e-9)


def _memory_rollout_step(model, n_mem: int, kv: MemoryKV, mem, chunk, t_chunk):
    """Prefill N memory frames into the right-aligned slots, then one denoising call."""
    (xm, am, wm, km), (xc, ac, wc, kc, text) = mem, chunk
    mem_pos, chunk_pos = memory_positions(n_mem)
    ctx = model.text_context(text)
    model(
        xm, torch.full((1, n_mem), 14.0), ctx, frame_positions=mem_pos, actions=am, viewmats=wm, intrinsics=km,
        kv_buffers=kv, write=kv.memory_tokens(n_mem), read=kv.memory_tokens(n_mem), prefill=True,
    )
    return model(
        xc, torch.full((1, 4), t_chunk), ctx, frame_positions=chunk_pos, actions=ac, viewmats=wc, intrinsics=kc,
        kv_buffers=kv, write=kv.chunk_tokens(), read=kv.attended_tokens(n_mem),
    )


@pytest.mark.parametrize("n_mem", [4, 8, 16])
def test_memory_kv_path_equals_one_masked_forward(models, n_mem):
    """Independent formulation: one forward over [memory; chunk] where memory tokens see only
    memory and chunk tokens see everything, with per-frame timesteps [14]*N + [t]*4 and
    positions 0..N+3, must give the same chunk velocity as prefill + cached denoising."""
    x, text, actions, viewmats, ks = _chunk_inputs(n_mem + 4, seed=n_mem)
    kv = MemoryKV(CFG.num_layers, 1, 2, S, CFG.num_attention_heads, CFG.attention_head_dim,
                  device="cpu", dtype=torch.float32)
    mem = (x[:, :, :n_mem], actions[:, :n_mem], viewmats[:, :n_mem], ks[:, :n_mem])
    chunk = (x[:, :, n_mem:], actions[:, n_mem:], viewmats[:, n_mem:], ks[:, n_mem:], text)
    with torch.no_grad():
        got = _memory_rollout_step(models, n_mem, kv, mem, chunk, 960.0)
        lm, lc = n_mem * S, 4 * S
        keep = torch.ones(lm + lc, lm + lc, dtype=torch.bool)
        keep[:lm, lm:] = False
        t = torch.tensor([[14.0] * n_mem + [960.0] * 4])
        full = models(x, t, text, actions=actions, viewmats=viewmats, intrinsics=ks, attn_mask=keep)
    assert rel_err(got, full[:, :, n_mem:]) <= 1e-5


def test_right_aligned_slots_equal_a_buffer_of_the_natural_size(models):
    """Chunks 1-3 (N = 4, 8, 12 memory frames) reuse the steady-state 16-slot buffer."""
    n_mem = 8
    x, text, actions, viewmats, ks = _chunk_inputs(n_mem + 4, seed=3)
    mem = (x[:, :, :n_mem], actions[:, :n_mem], viewmats[:, :n_mem], ks[:, :n_mem])
    chunk = (x[:, :, n_mem:], actions[:, n_mem:], viewmats[:, n_mem:], ks[:, n_mem:], text)
    args = (CFG.num_layers, 1, 2, S, CFG.num_attention_heads, CFG.attention_head_dim)
    big = MemoryKV(*args, device="cpu", dtype=torch.float32)
    exact = MemoryKV(*args, device="cpu", dtype=torch.float32, memory_slots=n_mem)
    big.k.fill_(float("nan"))  # slots that must never be read
    big.v.fill_(float("nan"))
    with torch.no_grad():
        a = _memory_rollout_step(models, n_mem, big, mem, chunk, 888.8889)
        b = _memory_rollout_step(models, n_mem, exact, mem, chunk, 888.8889)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)


def test_kv_buffers_are_written_in_place(models):
    kv = MemoryKV(CFG.num_layers, 1, 2, S, CFG.num_attention_heads, CFG.attention_head_dim,
                  device="cpu", dtype=torch.float32)
    ptrs = (kv.k.data_ptr(), kv.v.data_ptr())
    x, text, actions, viewmats, ks = _chunk_inputs(MEMORY_SLOTS + 4)
    mem = (x[:, :, :16], actions[:, :16], viewmats[:, :16], ks[:, :16])
    chunk = (x[:, :, 16:], actions[:, 16:], viewmats[:, 16:], ks[:, 16:], text)
    with torch.no_grad():
        _memory_rollout_step(models, 16, kv, mem, chunk, 1000.0)
    assert (kv.k.data_ptr(), kv.v.data_ptr()) == ptrs
    assert torch.isfinite(kv.k).all() and kv.k.abs().sum() > 0


def test_positions_keep_true_distance_of_recent_context():
    """For the 12 most recent context frames, query position - key position equals the true
    frame distance at every chunk (the invariant the NVIDIA port broke)."""
    for chunk in range(1, 40):
        cur = 4 * chunk
        if cur < MEMORY_SLOTS:
            selected = list(range(cur))
        else:  # any retrieved clip ending at or before cur - 12, plus the 12 recent frames
            clip = 4 * ((chunk * 7) % (chunk - 3))
            selected = sorted(set(range(clip, clip + 4)) | set(range(cur - 12, cur)))
        mem_pos, chunk_pos = memory_positions(len(selected))
        for q_i, q_pos in enumerate(chunk_pos.tolist()):
            for rank, frame in enumerate(selected):
                if frame >= cur - 12:
                    assert q_pos - mem_pos[rank].item() == (cur + q_i) - frame


def test_compiled_prope_transform_equals_matmul():
    """Inside torch.compile the 4x4 transforms are written as fused multiply-adds."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 3 * 6, 2, 8, generator=gen)
    m = torch.randn(1, 3, 4, 4, generator=gen)
    eager = apply_per_frame(x, m)
    compiled = torch.compile(apply_per_frame, dynamic=False)(x, m)
    assert rel_err(compiled, eager) <= 1e-6


def test_reuse_plan_keeps_slots_and_fills_vacated_ones():
    from worldplay.memory import MEMORY_SLOTS, ReuseState

    state = ReuseState()
    state.reset([0, 1, 2, 3, 4, 5, 6, 7], MEMORY_SLOTS)  # right-aligned: slots 8..15
    assert state.slot == {f: 8 + f for f in range(8)}
    # Growth: 12 frames; the old 8 keep their slots, the 4 new take the slots left of them.
    kept, missing = state.plan(list(range(12)), MEMORY_SLOTS)
    assert kept == {f: 8 + f for f in range(8)} and missing == [(8, 4), (9, 5), (10, 6), (11, 7)]
    state.commit(list(range(12)), kept, missing)
    assert state.positions[8] == 8 and state.positions[0] == 0
    # Steady: frames 0-3 leave, 12-15 arrive in the slots 0-3 vacated (slots 8..11).
    sel = list(range(4, 16))
    kept, missing = state.plan(sel, MEMORY_SLOTS)
    state.commit(sel, kept, missing)
    assert [s for _, s in missing] == [8, 9, 10, 11] and state.slot[12] == 8
    assert state.positions[4] == 0  # its keys must move from position 4 to 0
