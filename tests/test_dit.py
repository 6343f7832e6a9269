"""The native Wan 2.2 DiT against diffusers' WanTransformer3DModel with the same weights."""

from __future__ import annotations

import json

import diffusers  # test-only dependency: the independent reference
import pytest
import torch

from worldplay.checkpoint import build_on_device, load_dit, random_init_
from worldplay.config import DIT_PRESETS, DiTConfig
from worldplay.nn.dit import WanDiT

TINY = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=48, out_channels=48,
    text_dim=32, freq_dim=16, ffn_dim=64, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)  # fmt: skip


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """diffusers' Wan 2.2 TI2V transformer (scaled down) with random non-trivial weights, saved."""
    torch.manual_seed(1)
    ref = diffusers.WanTransformer3DModel(**TINY).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    path = tmp_path_factory.mktemp("dit")
    ref.save_pretrained(path)
    return ref, path


def _inputs(frames=3, height=8, width=12):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 48, frames, height, width, generator=g)
    text = torch.randn(1, 7, 32, generator=g)
    return x, text


def test_forward_matches_diffusers_with_per_token_timesteps(reference):
    ref, path = reference
    ours, identity = load_dit(path, device="cpu", dtype=torch.float32)
    assert identity.kind == "files" and len(identity.files) == 2
    x, text = _inputs()
    per_frame = torch.tensor([[14.0, 960.0, 888.8889]])
    tokens_per_frame = (8 // 2) * (12 // 2)
    per_token = per_frame.repeat_interleave(tokens_per_frame, dim=1)
    with torch.no_grad():
        want = ref(x, per_token, text, return_dict=False)[0]
        got_frame = ours(x, per_frame, text)
        got_token = ours(x, per_token, text)
    assert want.shape == got_frame.shape == (1, 48, 3, 8, 12)
    assert rel_err(got_frame, want) <= 1e-5
    assert rel_err(got_token, want) <= 1e-5
    # The timesteps really matter: a different first-frame timestep changes the output.
    with torch.no_grad():
        other = ours(x, torch.tensor([[0.0, 960.0, 888.8889]]), text)
    assert rel_err(other, want) > 1e-3


def test_scalar_timestep_matches_diffusers(reference):
    ref, path = reference
    ours, _ = load_dit(path, device="cpu", dtype=torch.float32)
    x, text = _inputs(frames=2)
    t = torch.tensor([727.2728])
    with torch.no_grad():
        want = ref(x, t, text, return_dict=False)[0]
        got = ours(x, t, text)
    assert rel_err(got, want) <= 1e-5


def test_sharded_checkpoint_loads_identically(reference, tmp_path):
    ref, path = reference
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    sharded, identity = load_dit(tmp_path, device="cpu", dtype=torch.float32)
    single, _ = load_dit(path, device="cpu", dtype=torch.float32)
    assert len(identity.files) > 3
    for (k, a), (_, b) in zip(sharded.state_dict().items(), single.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_unpatchify_order_is_pt_ph_pw_c():
    """The head emits (pt, ph, pw, c) per token — the opposite of the input patchify order."""
    cfg = DiTConfig(**{k: v for k, v in TINY.items()})
    model = WanDiT(cfg)
    c = cfg.out_channels
    out = torch.zeros(1, 2 * 1 * 1, 4 * c)  # F=2 frames of one 2x2 patch each
    for ph in range(2):
        for pw in range(2):
            for ch in range(c):
                out[0, :, (ph * 2 + pw) * c + ch] = 1000 * ch + 10 * ph + pw
    video = model.unpatchify(out, num_frames=2, height=2, width=2)
    for ph in range(2):
        for pw in range(2):
            assert torch.all(video[0, 5, :, ph, pw] == 5000 + 10 * ph + pw)


def test_presets_parameter_counts():
    with torch.device("meta"):
        base = WanDiT(DIT_PRESETS["wan5b"])
        hy = WanDiT(DIT_PRESETS["wan5b"], worldplay=True)
    assert sum(p.numel() for p in base.parameters()) == 4_999_787_712
    assert len(base.state_dict()) == 825
    assert sum(p.numel() for p in hy.parameters()) == 5_293_225_152
    assert len(hy.state_dict()) == 889
    with torch.device("meta"):
        ref = diffusers.WanTransformer3DModel(**DIT_PRESETS["wan5b"].to_dict())
    assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == {
        k: tuple(v.shape) for k, v in base.state_dict().items()
    }


def test_random_init_is_seeded_and_built_in_target_dtype():
    cfg = DIT_PRESETS["tiny"]
    a = build_on_device(lambda: WanDiT(cfg), "cpu", torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in a.parameters())
    ident = random_init_(a, seed=7)
    b = build_on_device(lambda: WanDiT(cfg), "cpu", torch.bfloat16)
    random_init_(b, seed=7)
    c = build_on_device(lambda: WanDiT(cfg), "cpu", torch.bfloat16)
    random_init_(c, seed=8)
    assert ident.describe() == "random-init:7"
    for (k, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb), k
        assert not torch.equal(pa, pc), k
        assert pa.float().abs().sum() > 0, k
    # It runs, and its output is finite and O(1).
    x = torch.randn(1, 48, 2, 4, 4, dtype=torch.bfloat16)
    with torch.no_grad():
        out = a(x, torch.tensor([[14.0, 1000.0]]), torch.randn(1, 5, cfg.text_dim))
    assert torch.isfinite(out.float()).all() and 0.01 < out.float().std() < 100


def test_config_from_real_style_json_warns_on_unknown_keys(tmp_path):
    """Unknown keys warn, as in diffusers (tests/test_checkpoint_diffusers.py: the weights stay strict)."""
    good = DIT_PRESETS["wan5b"].to_dict() | {"_diffusers_version": "0.35.0", "window_size": [-1, -1]}
    assert DiTConfig.from_dict(json.loads(json.dumps(good))) == DIT_PRESETS["wan5b"]
    with pytest.warns(UserWarning, match="unknown config keys.*'num_layerz'"):
        DiTConfig.from_dict(good | {"num_layerz": 3})


def test_rotate_temporal_equals_full_rope_rotation_by_temporal_tables():
    """The reuse mode's key re-rotation touches only the temporal features; rotating the others
    by angle 0 (what apply_rope with the same tables does) changes nothing, bit for bit."""
    from worldplay.nn.rope import apply_rope, rotate_temporal, temporal_rotation_tables

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3 * 5, 4, 128, generator=g).to(torch.bfloat16)
    cos, sin = temporal_rotation_tables(torch.tensor([-4.0, 2.0, 0.0], dtype=torch.float64), 5, 128)
    full = apply_rope(x, cos, sin)
    part = rotate_temporal(x.clone(), cos, sin)
    assert torch.equal(full, part)
    assert not torch.equal(part, x)  # the temporal features did move
    # One table row per frame, broadcast over its 5 tokens (what the reuse mode passes).
    cos1, sin1 = temporal_rotation_tables(torch.tensor([-4.0, 2.0, 0.0], dtype=torch.float64), 1, 128)
    per_frame = rotate_temporal(x.clone().unflatten(1, (3, 5)), cos1[:, None], sin1[:, None])
    assert torch.equal(per_frame.flatten(1, 2), full)
