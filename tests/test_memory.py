"""HY-WorldPlay additions on the backbone: zero-init equivalence, PRoPE, the in-place memory K/V."""

from __future__ import annotations

import pytest
import torch

from worldplay.checkpoint import random_init_
from worldplay.config import DIT_PRESETS
from worldplay.memory import MEMORY_SLOTS, Fp8MemoryKV, MemoryKV, memory_positions
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


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_every_kv_write_takes_the_one_store_path(models, fused, monkeypatch):
    """A memory prefill's last block writes only its keys/values, and they are those of a full
    block call (the same store path, bit for bit); the fused path on the CPU (the reference
    code) writes the same buffers; and the attention backend reaches every attention call,
    cached or not, self- or cross-, inside ``SelfAttnInputs``."""
    import worldplay.nn.dit as dit_module

    backends = []

    def recording(*args, backend="sdpa", **kwargs):
        backends.append(backend)
        return attention(*args, backend=backend, **kwargs)

    attention = dit_module.attention
    monkeypatch.setattr(dit_module, "attention", recording)
    n_mem = 8
    x, text, actions, viewmats, ks = _chunk_inputs(n_mem, seed=7)
    buffers = {}
    for prefill in (True, False):
        for use_fused in (False, fused):
            kv = MemoryKV(CFG.num_layers, 1, 2, S, CFG.num_attention_heads, CFG.attention_head_dim,
                          device="cpu", dtype=torch.float32)
            with torch.no_grad():
                models(x, torch.full((1, n_mem), 14.0), text, frame_positions=memory_positions(n_mem)[0],
                       actions=actions, viewmats=viewmats, intrinsics=ks, kv_buffers=kv,
                       write=kv.memory_tokens(n_mem), read=kv.memory_tokens(n_mem), prefill=prefill,
                       attention_backend="math", fused_kernels=use_fused)
            buffers[prefill, use_fused] = kv
    reference = buffers[False, False]
    assert reference.k.abs().sum() > 0
    for kv in buffers.values():
        assert torch.equal(kv.k, reference.k) and torch.equal(kv.v, reference.v)
    assert backends and set(backends) == {"math"}


# -- fp8 memory K/V (RolloutSettings.kv_dtype="fp8") -------------------------------------------


def _fp8_kv(memory_slots=MEMORY_SLOTS, dtype=torch.bfloat16):
    return Fp8MemoryKV(CFG.num_layers, 1, 2, S, CFG.num_attention_heads, CFG.attention_head_dim,
                       device="cpu", dtype=dtype, memory_slots=memory_slots)


def test_quantized_heads_round_trip_within_e4m3_precision():
    """Per token and head absmax scaling: every value comes back within half an e4m3 step
    (3 mantissa bits: 2^-4 relative) or, below e4m3's normal range, half its smallest step."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from worldplay.memory import quantize_heads

    @settings(max_examples=60, deadline=None)
    @given(st.integers(0, 2**31 - 1), st.floats(1e-3, 1e3))
    def check(seed, magnitude):
        x = torch.randn(3, 5, 2, 16, generator=torch.Generator().manual_seed(seed)) * magnitude
        x8, scale = quantize_heads(x)
        back = x8.float() * scale
        bound = torch.maximum(x.abs() * 2.0**-4, scale * 2.0**-10) * 1.0001
        assert (back - x).abs().le(bound).all()
        assert scale.shape == (3, 5, 2, 1)

    check()


def test_fp8_kv_chunk_attends_to_its_own_keys_exactly(models):
    """With no memory (chunk 0) the chunk's keys/values never pass through e4m3: they go
    straight to the work buffer, so the step equals the bf16 store's bit for bit."""
    model = WanDiT(CFG, worldplay=True).eval().to(torch.bfloat16)
    model.load_state_dict(models.state_dict())
    x, text, actions, viewmats, ks = _chunk_inputs(4, seed=11)
    outs = []
    for kv in (MemoryKV(CFG.num_layers, 1, 2, S, CFG.num_attention_heads, CFG.attention_head_dim, device="cpu",
                        dtype=torch.bfloat16), _fp8_kv()):
        with torch.no_grad():
            outs.append(model(x, torch.full((1, 4), 900.0), text, frame_positions=torch.arange(4.0), actions=actions,
                              viewmats=viewmats, intrinsics=ks, kv_buffers=kv, write=kv.chunk_tokens(),
                              read=kv.attended_tokens(0)))
    assert torch.equal(outs[0], outs[1])


def test_fp8_kv_store_holds_the_prefill_keys_and_the_step_stays_close(models):
    """A prefill of 8 memory frames stores e4m3 keys/values that dequantise to the bf16 store's
    within e4m3 precision; the step that attends to them stays within a few percent of the bf16
    result (the drift experiments measure what this does to a rollout)."""
    model = WanDiT(CFG, worldplay=True).eval().to(torch.bfloat16)
    model.load_state_dict(models.state_dict())
    n_mem = 8
    x, text, actions, viewmats, ks = _chunk_inputs(n_mem + 4, seed=3)
    mem = (x[:, :, :n_mem], actions[:, :n_mem], viewmats[:, :n_mem], ks[:, :n_mem])
    chunk = (x[:, :, n_mem:], actions[:, n_mem:], viewmats[:, n_mem:], ks[:, n_mem:], text)
    exact = MemoryKV(CFG.num_layers, 1, 2, S, CFG.num_attention_heads, CFG.attention_head_dim, device="cpu",
                     dtype=torch.bfloat16)
    fp8 = _fp8_kv()
    with torch.no_grad():
        want = _memory_rollout_step(model, n_mem, exact, mem, chunk, 960.0)
        got = _memory_rollout_step(model, n_mem, fp8, mem, chunk, 960.0)
    block = exact.memory_tokens(n_mem)
    for layer in range(CFG.num_layers):
        q = fp8.layer(layer)
        for x8, scale, ref in ((q.k8, q.k_scale, exact.k[layer]), (q.v8, q.v_scale, exact.v[layer])):
            back = x8[:, block].float() * scale[:, block]
            assert (back - ref[:, block].float()).abs().le(ref[:, block].float().abs() * 2.0**-4 + scale[:, block]
                                                           * 2.0**-9).all()
    assert not torch.equal(got, want)
    assert rel_err(got, want) < 0.05


def test_released_kv_is_rebuilt_without_reading_stale_slots(monkeypatch):
    """release_kv_for_decode frees the K/V before every decode; the next prefill reallocates it.
    Reallocated as NaN, any slot read before it is written would poison the frames: the rollout
    equals the default one bit for bit, so nothing is read from before the release."""
    from conftest import tiny_pipeline_inputs

    import worldplay.memory as memory
    from worldplay.pose import trajectory_from_pose_string
    from worldplay.rollout import RolloutSettings

    real = memory._allocate
    calls = []

    def nan_after_the_first(what, shapes, device, fill=True):
        out = real(what, shapes, device, fill)
        calls.append(what)
        if len(calls) > 1:
            for t in out.values():
                t.fill_(float("nan"))
        return out

    pipe, image, text = tiny_pipeline_inputs()
    traj = trajectory_from_pose_string("w-23")

    def run(**overrides):
        settings = RolloutSettings(num_chunk=6, seed=0, noise_latents=24, **overrides)
        return torch.cat([o.frames for o in pipe.rollout(image, text, traj, settings)])

    plain = run()
    monkeypatch.setattr(memory, "_allocate", nan_after_the_first)
    released = run(release_kv_for_decode=True)
    assert len(calls) == 6  # the first allocation and one after each of the first five decodes
    assert torch.equal(released, plain)


def test_a_store_is_one_aligned_allocation():
    """k and v (and the fp8 store's scales and work buffers) are views of one allocation, each on
    a 256-byte boundary: a store freed in its own pool comes back as one block, at one address."""
    for kv in (MemoryKV(CFG.num_layers, 1, 2, 7, CFG.num_attention_heads, CFG.attention_head_dim, device="cpu",
                        dtype=torch.bfloat16),
               Fp8MemoryKV(CFG.num_layers, 1, 2, 7, CFG.num_attention_heads, CFG.attention_head_dim, device="cpu",
                           dtype=torch.bfloat16)):
        tensors = list(kv._tensors.values())
        base = tensors[0].untyped_storage().data_ptr()
        assert all(t.untyped_storage().data_ptr() == base for t in tensors)
        assert all((t.data_ptr() - base) % 256 == 0 for t in tensors)  # CUDA bases are 512-aligned
        assert [tuple(t.shape) for t in tensors] == [shape for shape, _ in kv.shapes().values()]
        assert [t.dtype for t in tensors] == [dtype for _, dtype in kv.shapes().values()]
        ends = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(ends[:-1], ends[1:], strict=True))  # no overlap
        assert all(not t.any() for t in tensors if t.dtype != torch.float8_e4m3fn)  # zero-filled at first


def test_lending_frees_the_store_and_the_next_layer_call_brings_it_back():
    kv = MemoryKV(CFG.num_layers, 1, 2, 7, CFG.num_attention_heads, CFG.attention_head_dim, device="cpu",
                  dtype=torch.bfloat16, lend_pool=True)  # no pool on the CPU: lending is a release
    assert kv.acquisitions == 1 and kv._pool is None
    with kv.lent():
        assert kv._tensors is None
    k, _ = kv.layer(0)
    assert kv.acquisitions == 2 and k.shape == kv.k[0].shape
    assert len(kv.addresses) == 2 and kv.moves in (0, 1)  # the CPU allocator may move it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the allocator pool is CUDA's")
def test_a_lent_store_comes_back_at_its_address_on_cuda():
    kv = MemoryKV(2, 1, 2, 64, 4, 32, device="cuda", dtype=torch.bfloat16, lend_pool=True)
    where = kv.addresses
    for size in (kv.nbytes // 2, 3 * kv.nbytes):  # within and beyond the store
        with kv.lent():
            scratch = torch.ones(size, device="cuda", dtype=torch.uint8)
            del scratch
        assert kv.addresses == where
    assert kv.moves == 0 and kv.acquisitions == 3


def test_the_runner_captures_its_graphs_again_when_the_store_moved(monkeypatch):
    """A graph replays the K/V addresses it captured: the runner keeps a graph while the store is
    where it was and captures it again (counted, with a note) if it came back elsewhere."""
    import worldplay.accel as accel

    captured = []

    class FakeGraph:
        def __init__(self, fn, statics, pool=None):
            captured.append(statics)
            self.fn = fn

        def __call__(self, **inputs):
            return self.fn()

    monkeypatch.setattr(accel, "CapturedCall", FakeGraph)
    monkeypatch.setattr(accel.torch.cuda, "graph_pool_handle", lambda: object())

    class Store:
        addresses = (1, 2)

    runner = accel.DiTRunner.__new__(accel.DiTRunner)
    runner.stats, runner._graphs, runner._pool = accel.AccelStats(), {}, None
    store, x = Store(), torch.zeros(1)
    for _ in range(3):
        runner._call("step", True, lambda i: i["latents"], {"latents": x}, store)
    assert runner.stats.captures == 1 and runner.stats.replays == 3
    store.addresses = (3, 4)
    runner._call("step", True, lambda i: i["latents"], {"latents": x}, store)
    assert runner.stats.captures == 2 and "moved" in runner.stats.notes[0]
    runner._call("step", True, lambda i: i["latents"], {"latents": x}, store)
    assert runner.stats.captures == 2
