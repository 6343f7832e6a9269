"""FP8 linears: the quantisation round trip, the layer against bf16 and a float64 reference, the
fp8 variant of a DiT (the DiT itself untouched), and an fp8 rollout that stays close to the bf16 one."""

import pytest
import torch
from conftest import tiny_pipeline_inputs

from worldplay.models import random_models
from worldplay.nn.fp8 import E4M3_MAX, Fp8Linear, Fp8Linears, quantize_rows
from worldplay.pose import trajectory_from_pose_string
from worldplay.rollout import RolloutError, RolloutSettings


def test_quantize_rows_round_trip_is_within_e4m3_precision():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 128, generator=g) * torch.logspace(-3, 3, 64)[:, None]  # rows of very different sizes
    x8, scale = quantize_rows(x)
    assert x8.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    assert torch.allclose(x8.float().abs().amax(-1), torch.full((64,), E4M3_MAX))  # each row uses the range
    rel = ((x8.float() * scale - x).norm(dim=-1) / x.norm(dim=-1)).max()
    assert rel < 0.04  # e4m3 has 3 mantissa bits: ~2^-4 relative step


def test_fp8_linear_is_close_to_the_exact_product():
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(256, 192).to(torch.bfloat16)
    x = torch.randn(3, 40, 256, generator=g).to(torch.bfloat16)
    exact = x.double() @ lin.weight.double().t() + lin.bias.double()
    got = Fp8Linear(lin)(x)
    bf16 = lin(x)
    assert got.shape == bf16.shape == (3, 40, 192) and got.dtype == torch.bfloat16
    err_fp8 = ((got.double() - exact).norm() / exact.norm()).item()
    err_bf16 = ((bf16.double() - exact).norm() / exact.norm()).item()
    assert err_bf16 < 0.01 < err_fp8 < 0.06  # fp8 is an approximation, of the expected size


def test_fp8_linears_swap_in_and_out():
    models = random_models("tiny", 0, device="cpu")
    block = models.dit.blocks[0]
    before = block.ffn.net[2]
    fp8 = Fp8Linears(models.dit)
    block8 = fp8.model().blocks[0]  # the DiT that runs the fp8 linears
    assert isinstance(block8.ffn.net[2], Fp8Linear) and isinstance(block8.attn1.to_q, Fp8Linear)
    assert not isinstance(block8.attn2.to_k, Fp8Linear)  # text K/V: once per prompt, bf16
    assert block8.attn2.to_k is block.attn2.to_k  # everything else is shared, not copied
    assert block.ffn.net[2] is before and not isinstance(block.attn1.to_q, Fp8Linear)  # the DiT is untouched
    first = fp8.model().blocks[0].ffn.net[2]  # cached: the same quantised modules
    assert first is block8.ffn.net[2]
    with torch.no_grad():
        before.weight.mul_(2)  # a weight change invalidates the cache
    assert fp8.model().blocks[0].ffn.net[2] is not first


def test_fp8_rollout_stays_close_to_bf16():
    pipe, image, text = tiny_pipeline_inputs()
    traj = trajectory_from_pose_string("w-11")
    out = {}
    for dtype in ("bf16", "fp8"):
        out[dtype] = list(pipe.rollout(image, text, traj, RolloutSettings(num_chunk=3, noise_latents=12,
                                                                          linear_dtype=dtype)))
    for a, b in zip(out["fp8"], out["bf16"], strict=True):
        rel = ((a.latents - b.latents).norm() / b.latents.norm()).item()
        assert 0.002 < rel < 0.05  # measured ~0.012-0.014 on this seed
    assert not isinstance(pipe.dit.blocks[0].attn1.to_q, Fp8Linear)  # put back after the rollout


def test_fp8_needs_bf16_models():
    with pytest.raises(RolloutError, match="linear_dtype"):
        RolloutSettings(num_chunk=1, linear_dtype="int4")
