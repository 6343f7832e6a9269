"""Parity tests of the native Wan 2.2 VAE against diffusers' ``AutoencoderKLWan``.

The reference is a scaled-down Wan 2.2 VAE (same structure as the 5B one: residual up/down
blocks, patch 2, 48 latent channels, temporal down-sampling in stages 1 and 2) with random
weights, saved with ``save_pretrained`` and loaded into ``WanVAE`` with ``strict=True``.
Everything runs in float32 on the CPU.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders import autoencoder_kl_wan as dwan
from safetensors.torch import load_file

from worldplay.config import VAE_PRESETS, VAEConfig
from worldplay.nn.vae import WanVAE, patchify, unpatchify

TOL = 1e-5
B, H, W = 2, 32, 48  # pixels; latent grid 2x3 (non-square to catch h/w mix-ups)
LH, LW = H // 16, W // 16

TINY_WAN22 = dict(
    base_dim=8,
    decoder_base_dim=16,
    z_dim=48,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
    is_residual=True,
    in_channels=12,
    out_channels=12,
    patch_size=2,
    scale_factor_spatial=16,
    scale_factor_temporal=4,
    latents_mean=list(VAE_PRESETS["wan5b"].latents_mean),
    latents_std=list(VAE_PRESETS["wan5b"].latents_std),
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def read_vae_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Read a diffusers ``vae/`` folder's weights (to be replaced by the project's checkpoint loader)."""
    return load_file(model_dir / "diffusion_pytorch_model.safetensors")


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter non-zero: weights ~ N(0, 1/fan_in) (keeps activations O(1) through the
    whole stack), biases ~ N(0, 0.05^2), RMS gammas ~ 1 + N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.1 * noise)
            elif p.dim() > 1:
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                p.copy_(0.05 * noise)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[AutoencoderKLWan, WanVAE]:
    ref = AutoencoderKLWan(**TINY_WAN22).eval()
    _randomize(ref, seed=1234)
    model_dir = tmp_path_factory.mktemp("wan22_tiny_vae")
    ref.save_pretrained(model_dir)
    config = VAEConfig.from_dict(json.loads((model_dir / "config.json").read_text()), source="config.json")
    ours = WanVAE(config).eval()
    ours.load_state_dict(read_vae_weights(model_dir), strict=True)
    return ref, ours


def _stats(vae: WanVAE) -> tuple[torch.Tensor, torch.Tensor]:
    c = vae.config
    return (
        torch.tensor(c.latents_mean).view(1, -1, 1, 1, 1),
        torch.tensor(c.latents_std).view(1, -1, 1, 1, 1),
    )


def _pixels(frames: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, frames, H, W, generator=g) * 2 - 1


def _latents(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 48, n, LH, LW, generator=g)


@torch.no_grad()
def _hy_stream_decode(ref: AutoencoderKLWan, z_raw: torch.Tensor) -> torch.Tensor:
    """HY-WorldPlay's ``MyVAE`` decode of a whole rollout: one latent per decoder call, cache
    cleared once and kept across calls, ``first_chunk`` only for latent 0."""
    ref.clear_cache()
    outs = []
    for i in range(z_raw.shape[2]):
        x = ref.post_quant_conv(z_raw[:, :, i : i + 1])
        ref._conv_idx = [0]
        outs.append(ref.decoder(x, feat_cache=ref._feat_map, feat_idx=ref._conv_idx, first_chunk=(i == 0)))
    return dwan.unpatchify(torch.cat(outs, dim=2), patch_size=2).clamp(-1.0, 1.0)


# ---------------------------------------------------------------------------------------------


def test_state_dict_layout_matches_diffusers(models):
    ref, ours = models
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert {k: tuple(v.shape) for k, v in ours_sd.items()} == {k: tuple(v.shape) for k, v in ref_sd.items()}
    assert not any("latents" in k for k in ours_sd)  # constants are non-persistent
    # The random init really reached every tensor (no zero weights that would hide a bug).
    assert all((v == 0).float().mean() < 1e-3 and v.abs().mean() > 1e-3 for v in ours_sd.values())


def test_encode_image_matches_diffusers(models):
    ref, ours = models
    image = _pixels(1, seed=1)
    with torch.no_grad():
        post = ref.encode(image).latent_dist
    mu, logvar = ours.encode(image)
    assert mu.shape == logvar.shape == (B, 48, 1, LH, LW)
    assert rel_err(mu, post.mean) <= TOL
    assert rel_err(logvar, post.logvar) <= TOL
    assert 0.05 < mu.std().item() < 10.0  # activations are O(1): the comparison is meaningful

    mean, std = _stats(ours)
    z_mode = ours.encode_image(image[:, :, 0], mode="mode")  # [B,3,H,W] input
    assert z_mode.dtype == torch.float32 and z_mode.shape == (B, 48, 1, LH, LW)
    assert rel_err(z_mode, (post.mean - mean) / std) <= TOL

    # Posterior sample: same generator draw as diffusers' DiagonalGaussianDistribution.sample.
    z_sample = ours.encode_image(image, mode="sample", generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref_sample = post.sample(generator=torch.Generator().manual_seed(7))
    assert rel_err(z_sample, (ref_sample - mean) / std) <= TOL
    assert rel_err(z_sample, z_mode) > 1e-3  # the noise was actually added

    with pytest.raises(ValueError):
        ours.encode_image(image, mode="argmax")


@pytest.mark.parametrize("frames", [5, 9])
def test_encode_video_matches_diffusers(models, frames):
    ref, ours = models
    video = _pixels(frames, seed=frames)
    with torch.no_grad():
        post = ref.encode(video).latent_dist
    mu, logvar = ours.encode(video)
    assert mu.shape == (B, 48, 1 + (frames - 1) // 4, LH, LW)
    assert rel_err(mu, post.mean) <= TOL
    assert rel_err(logvar, post.logvar) <= TOL


def test_encode_rejects_bad_frame_count(models):
    _, ours = models
    with pytest.raises(ValueError):
        ours.encode(_pixels(4, seed=0))


def test_logvar_is_clamped():
    vae = WanVAE(VAE_PRESETS["tiny"]).eval()
    with torch.no_grad():
        vae.quant_conv.bias[48:] = 1e4  # pushes logvar far above the clamp
        vae.quant_conv.bias[:48] = -1e4  # mu stays unclamped
    mu, logvar = vae.encode(torch.zeros(1, 3, 1, 32, 32))
    assert torch.all(logvar == 20.0)
    assert mu.max().item() < -1e3


@torch.no_grad()
def test_streaming_decode_matches_hy_per_latent_decode(models):
    ref, ours = models
    n = 8  # chunk 0 (with the 1-frame latent 0) and chunk 1
    z_norm = _latents(n, seed=3)
    mean, std = _stats(ours)
    expected = _hy_stream_decode(ref, z_norm * std + mean)
    assert expected.shape == (B, 3, 1 + 4 * (n - 1), H, W)
    # Mostly unclamped output, so the comparison tests the network and not the clamp.
    assert (expected.abs() < 0.999).float().mean().item() > 0.5

    state = ours.new_decode_state(B, LH, LW)
    assert not state.first_latent_done

    # (i) all latents in one decoder call
    one_call = ours.decode(z_norm, state)
    assert state.first_latent_done
    assert one_call.shape == expected.shape
    err_one = rel_err(one_call, expected)

    # (ii) one latent per call, the HY way
    state.reset()
    per_latent = [ours.decode(z_norm[:, :, i : i + 1], state) for i in range(n)]
    assert [f.shape[2] for f in per_latent] == [1] + [4] * (n - 1)
    per_latent = torch.cat(per_latent, dim=2)
    err_per = rel_err(per_latent, expected)

    # The fixed buffers hold exactly what diffusers' cache holds after the same latents.
    ref_cache = [c for c in ref._feat_map if c is not None]
    assert len(ref_cache) == len(state.buffers) == 32
    for mine, theirs in zip(state.buffers, ref_cache, strict=True):
        assert isinstance(theirs, torch.Tensor) and mine.shape == theirs.shape
        assert rel_err(mine, theirs) <= TOL

    # (iii) chunk 0 split as 1 + 3 latents, then a 4-latent chunk 1
    state.reset()
    parts = [ours.decode(z_norm[:, :, a:b], state) for a, b in ((0, 1), (1, 4), (4, 8))]
    assert [p.shape[2] for p in parts] == [1, 12, 16]
    err_split = rel_err(torch.cat(parts, dim=2), expected)

    print(
        f"decode rel err vs diffusers: one call {err_one:.2e}, per latent {err_per:.2e}, 1+3+4 {err_split:.2e}"
    )
    assert err_one <= TOL and err_per <= TOL and err_split <= TOL
    assert rel_err(one_call, per_latent) <= 1e-6  # our own paths agree to float rounding


@torch.no_grad()
def test_first_latent_cache_matches_diffusers(models):
    """After latent 0 alone, diffusers holds 1-frame caches and the 'Rep' marker; the fixed
    2-frame buffers must hold ``[0, frame]`` and zeros respectively."""
    ref, ours = models
    z_norm = _latents(1, seed=4)
    mean, std = _stats(ours)
    _hy_stream_decode(ref, z_norm * std + mean)
    state = ours.new_decode_state(B, LH, LW)
    ours.decode(z_norm, state)
    ref_cache = [c for c in ref._feat_map if c is not None]
    assert len(ref_cache) == len(state.buffers)
    reps = 0
    for mine, theirs in zip(state.buffers, ref_cache, strict=True):
        if isinstance(theirs, str):
            assert theirs == "Rep"
            assert torch.count_nonzero(mine) == 0
            reps += 1
        else:
            assert theirs.shape[2] == 1
            assert torch.count_nonzero(mine[:, :, 0]) == 0
            assert rel_err(mine[:, :, 1:], theirs) <= TOL
    assert reps == 2


@torch.no_grad()
def test_fresh_chunk_matches_diffusers_stock_decode(models):
    """diffusers' own ``decode`` (fresh cache, first_chunk on latent 0) gives 13 frames for 4 latents."""
    ref, ours = models
    z_norm = _latents(4, seed=5)
    mean, std = _stats(ours)
    expected = ref.decode(z_norm * std + mean).sample
    got = ours.decode(z_norm, ours.new_decode_state(B, LH, LW))
    assert got.shape == expected.shape == (B, 3, 13, H, W)
    assert rel_err(got, expected) <= TOL


@torch.no_grad()
def test_bf16_matches_hy_decode_path(models):
    """bf16 as HY runs it: latents cast to bf16, de-normalised with bf16 ``1/std`` and mean, one
    latent per diffusers call. Ours decodes two 4-latent chunks. (Bit-exact on the CPU here; the
    tolerance leaves room for other oneDNN kernels but catches layout slips, e.g. a
    non-contiguous SDPA input cost 1.2e-2.)"""
    ref, ours = (copy.deepcopy(m).to(torch.bfloat16) for m in models)
    mean, std = _stats(ours)
    z_norm = _latents(8, seed=8)
    expected = _hy_stream_decode(ref, z_norm.bfloat16() / (1.0 / std).bfloat16() + mean.bfloat16())
    state = ours.new_decode_state(B, LH, LW, dtype=torch.bfloat16)
    got = torch.cat([ours.decode(z_norm[:, :, :4], state), ours.decode(z_norm[:, :, 4:], state)], dim=2)
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape
    assert rel_err(got, expected) <= 1e-3

    video = _pixels(5, seed=9).bfloat16()
    post = ref.encode(video).latent_dist
    mu, logvar = ours.encode(video)
    assert rel_err(mu, post.mean) <= 1e-3 and rel_err(logvar, post.logvar) <= 1e-3


def test_patchify_channel_order():
    b, c, t, h, w = 1, 3, 2, 4, 6  # 2x3 blocks of 2x2 pixels
    row = torch.arange(h).view(h, 1)
    col = torch.arange(w).view(1, w)
    block = (row // 2) * (w // 2) + col // 2
    chan = torch.arange(c).view(c, 1, 1, 1)
    frame = torch.arange(t).view(1, t, 1, 1)
    # value = 1000*c + 100*block + 10*row_in_block + col_in_block + 10000*frame
    img = (1000 * chan + 10000 * frame + 100 * block + 10 * (row % 2) + (col % 2)).to(torch.float64)
    img = img.unsqueeze(0)  # [1, 3, 2, 4, 6]

    p = patchify(img)
    assert p.shape == (b, 12, t, h // 2, w // 2)
    for ci in range(c):
        for pw in range(2):
            for ph in range(2):
                for bi in range(h // 2):
                    for bj in range(w // 2):
                        expect = 1000 * ci + 100 * (bi * (w // 2) + bj) + 10 * ph + pw
                        got = p[0, ci * 4 + pw * 2 + ph, :, bi, bj]
                        assert torch.equal(got, expect + 10000 * torch.arange(t, dtype=torch.float64))
    # Spot checks with explicit channel numbers: channel 1 is (c0, pw0, ph1), 2 is (c0, pw1, ph0).
    assert p[0, 1, 0, 0, 0].item() == 10 and p[0, 2, 0, 0, 0].item() == 1 and p[0, 7, 0, 0, 1].item() == 1111
    assert torch.equal(p, dwan.patchify(img, patch_size=2))
    assert torch.equal(unpatchify(p), img)


@torch.no_grad()
def test_decode_state_storage_is_static(models):
    _, ours = models
    state = ours.new_decode_state(B, LH, LW)
    tensors = list(state.buffers)
    pointers = [buf.data_ptr() for buf in state.buffers]
    assert all(torch.count_nonzero(buf) == 0 for buf in tensors)

    z_norm = _latents(8, seed=6)
    chunk0 = ours.decode(z_norm[:, :, :4], state)
    ours.decode(z_norm[:, :, 4:], state)
    assert all(a is b for a, b in zip(state.buffers, tensors, strict=True))
    assert [buf.data_ptr() for buf in state.buffers] == pointers
    assert all(torch.count_nonzero(buf) > 0 for buf in state.buffers)  # every buffer was written

    state.reset()
    assert not state.first_latent_done
    assert [buf.data_ptr() for buf in state.buffers] == pointers
    assert all(torch.count_nonzero(buf) == 0 for buf in state.buffers)
    assert torch.equal(ours.decode(z_norm[:, :, :4], state), chunk0)

    with pytest.raises(ValueError):
        ours.decode(_latents(1, seed=0)[:, :, :, :, :2], state)  # wrong latent grid


def test_tiny_preset_streams():
    vae = WanVAE(VAE_PRESETS["tiny"]).eval()
    state = vae.new_decode_state(1, 2, 2)
    z = torch.randn(1, 48, 8, 2, 2)
    first, second = vae.decode(z[:, :, :4], state), vae.decode(z[:, :, 4:], state)
    assert first.shape == (1, 3, 13, 32, 32) and second.shape == (1, 3, 16, 32, 32)
    assert vae.decoded_frames(4, False) == 13 and vae.decoded_frames(4, True) == 16
    assert first.abs().max() <= 1.0


def test_latent_stats_stay_float32_and_follow_hy():
    vae = WanVAE(VAE_PRESETS["tiny"]).to(torch.bfloat16)
    mean, std = _stats(vae)
    assert vae.latents_mean.dtype == vae.latents_inv_std.dtype == torch.float32
    assert torch.equal(vae.latents_mean, mean) and torch.equal(vae.latents_std, std)
    inv_std = 1.0 / std  # HY: `1.0 / torch.tensor(config.latents_std)`, float32

    z = torch.randn(1, 48, 2, 3, 4)
    # Encode side (HY): float32, (z - mean) * (1/std).
    z_bf = z.bfloat16()
    assert torch.equal(vae.normalize_latents(z_bf), (z_bf.float() - mean) * inv_std)
    # Decode side (HY decode_next_latent): bf16, z / bf16(1/std) + bf16(mean).
    out = vae.denormalize_latents(z_bf)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, z_bf / inv_std.bfloat16() + mean.bfloat16())
    # float32 round trip
    assert rel_err(vae.denormalize_latents(vae.normalize_latents(z)), z) <= 1e-6


def test_wan5b_layout_on_meta():
    cfg = VAE_PRESETS["wan5b"]
    kwargs = {k: v for k, v in cfg.to_dict().items() if not k.startswith("_")}
    with torch.device("meta"):
        ours = WanVAE(cfg)
        ref = AutoencoderKLWan(**kwargs)
    assert sum(p.numel() for p in ours.parameters()) == 704_688_668
    ours_sd = ours.state_dict()
    assert len(ours_sd) == 196
    assert {k: tuple(v.shape) for k, v in ours_sd.items()} == {
        k: tuple(v.shape) for k, v in ref.state_dict().items()
    }
    assert sum(p.numel() for p in ours.encoder.parameters()) == 149_627_776
    assert sum(p.numel() for p in ours.decoder.parameters()) == 555_049_228
    assert len(ours.decoder.slots) == 32


def test_channels_last_decode_equals_contiguous():
    """The fast-decode layout (NDHWC weights, activations and history) is the same function."""
    from worldplay.decode_runner import DecodeOptions, DecodeRunner
    from worldplay.models import random_models

    vae = random_models("tiny", 0, device="cpu", dtype=torch.float32).vae
    z = torch.randn(1, 48, 8, 4, 6, generator=torch.Generator().manual_seed(0))

    def stream(v):
        state = v.new_decode_state(1, 4, 6)
        return torch.cat([v.decode(z[:, :, :4], state), v.decode(z[:, :, 4:], state)], dim=2)

    plain = stream(vae)
    fast_decoder = DecodeRunner(vae, DecodeOptions(channels_last=True))
    assert fast_decoder.new_decode_state(1, 4, 6).buffers[0].is_contiguous(memory_format=torch.channels_last_3d)
    fast = stream(fast_decoder)
    assert rel_err(fast, plain) <= 1e-5
    assert torch.equal(stream(vae), plain)


def test_decode_relays_out_a_state_made_before_the_layout_switch():
    """A decode state allocated before fast decode was switched on still decodes the stream
    (history values kept across the switch, mid-stream too), and its buffers move to the
    channels-last layout, so the convs get no transposing copies."""
    from worldplay.decode_runner import DecodeOptions, DecodeRunner
    from worldplay.models import random_models

    vae = random_models("tiny", 0, device="cpu", dtype=torch.float32).vae
    z = torch.randn(1, 48, 8, 4, 6, generator=torch.Generator().manual_seed(0))
    state = vae.new_decode_state(1, 4, 6)
    plain = torch.cat([vae.decode(z[:, :, :4], state), vae.decode(z[:, :, 4:], state)], dim=2)

    state = vae.new_decode_state(1, 4, 6)
    first = vae.decode(z[:, :, :4], state)
    fast_decoder = DecodeRunner(vae, DecodeOptions(channels_last=True))
    assert not state.buffers[0].is_contiguous(memory_format=torch.channels_last_3d)
    second = fast_decoder.decode(z[:, :, 4:], state)
    assert all(b.is_contiguous(memory_format=torch.channels_last_3d) for b in state.buffers)
    assert rel_err(torch.cat([first, second], dim=2), plain) <= 1e-5


def test_graphed_decode_equals_eager(monkeypatch, rerun_graph):
    """fast_decode graphs, with a stand-in for the CUDA graph that re-runs the captured call at
    every replay: the capture bookkeeping (static input, the warm-up call undone on the history
    buffers, the output copied out) must leave the stream exactly as the eager decode does. The
    stand-in's warm-up really runs, so a missing restore would advance the stream and fail."""
    import worldplay.decode_runner as decode_runner
    from worldplay.models import random_models

    monkeypatch.setattr(decode_runner, "CapturedCall", rerun_graph)
    monkeypatch.setattr(decode_runner, "_graphs_possible", lambda buffer: True)
    vae = random_models("tiny", 0, device="cpu", dtype=torch.float32).vae
    z = torch.randn(1, 48, 16, 4, 6, generator=torch.Generator().manual_seed(0))

    def stream(v):
        state = v.new_decode_state(1, 4, 6)
        outs = [v.decode(z[:, :, i:i + 4], state) for i in range(0, 16, 4)]
        return torch.cat(outs, dim=2)

    plain = stream(vae)
    graphed = stream(decode_runner.DecodeRunner(vae, decode_runner.DecodeOptions(graphs=True)))
    assert rerun_graph.captures == 1 and rerun_graph.replays == 3  # latent groups 2-4 of the stream
    assert torch.equal(graphed, plain)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decoding_by_latent_groups_and_frame_slices_gives_the_same_frames(dtype):
    """RolloutSettings.decode_group / decode_top_frames: a stream decoded 1 or 2 latents per call,
    and with the full-resolution stages 1 or 2 frames at a time, gives the frames of 4 latents per
    call. Every causal conv reads the frames before its slice from its history, as between calls.
    In bf16 on the CPU the frames are identical bit for bit; in float32 the convolutions' sums
    run in another order for other frame counts (oneDNN picks its blocking by shape), so they
    agree to float32 rounding."""
    from worldplay.decode_runner import DecodeOptions, DecodeRunner
    from worldplay.models import random_models

    vae = random_models("tiny", 0, device="cpu", dtype=dtype).vae
    z = torch.randn(1, 48, 12, 4, 6, generator=torch.Generator().manual_seed(0)).to(dtype)

    def stream(**options):
        runner = DecodeRunner(vae, DecodeOptions(**options))
        state = runner.new_decode_state(1, 4, 6)
        return torch.cat([runner.decode(z[:, :, c : c + 4], state) for c in range(0, 12, 4)], dim=2)

    whole = stream()
    assert whole.shape[2] == 4 * 12 - 3
    for options in ({"group": 1}, {"group": 2}, {"group": 1, "top_frames": 1}, {"group": 4, "top_frames": 2},
                    {"group": 2, "top_frames": 1}):
        got = stream(**options)
        if dtype == torch.bfloat16:
            assert torch.equal(got, whole), options
        else:
            assert rel_err(got, whole) <= 1e-6, options


def test_channels_last_without_a_weight_copy_shares_the_vae_weights():
    """DecodeOptions(copy_weights=False): channels-last activations against the VAE's own
    contiguous weights; no second decoder, the same frames (float32: to rounding)."""
    from worldplay.decode_runner import DecodeOptions, DecodeRunner
    from worldplay.models import random_models

    vae = random_models("tiny", 0, device="cpu", dtype=torch.float32).vae
    z = torch.randn(1, 48, 8, 4, 6, generator=torch.Generator().manual_seed(0))
    shared = DecodeRunner(vae, DecodeOptions(channels_last=True, copy_weights=False))
    copied = DecodeRunner(vae, DecodeOptions(channels_last=True))
    assert shared.decoder is vae.decoder and shared.weight_copy_nbytes == 0
    assert copied.weight_copy_nbytes == sum(p.numel() * p.element_size() for p in vae.decoder.parameters())
    outs = []
    for runner in (shared, copied):
        state = runner.new_decode_state(1, 4, 6)
        assert state.buffers[0].is_contiguous(memory_format=torch.channels_last_3d)
        outs.append(torch.cat([runner.decode(z[:, :, :4], state), runner.decode(z[:, :, 4:], state)], dim=2))
    assert rel_err(outs[0], outs[1]) <= 1e-5
