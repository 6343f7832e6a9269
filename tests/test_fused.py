"""worldplay.nn.fused: the Triton kernel (in Triton's CPU interpreter) against the PyTorch
reference, and rollouts with ``fused_kernels`` against rollouts without."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_pipeline_inputs

from worldplay.nn.fused import linear_gelu_tanh, rotate_and_store
from worldplay.pose import trajectory_from_pose_string
from worldplay.rollout import RolloutSettings

# Runs in a fresh interpreter: Triton reads TRITON_INTERPRET when it is first imported.
KERNEL_CHECK = textwrap.dedent("""
    import torch
    from worldplay.nn.fused import rotate_and_store, rotate_and_store_reference
    from worldplay.nn.prope import PRoPE
    from worldplay.nn.rope import rope_tables
    from worldplay.nn.triton_kernels import interpreted_rotate_store_kernel

    kernel = interpreted_rotate_store_kernel()
    torch.manual_seed(0)
    bf16 = torch.bfloat16
    failures = []
    for batch, heads, head_dim, prope_on, indexed, with_q, normed in [
        (1, 3, 128, True, False, True, False),   # 3 heads: a row padded to 4 in the kernel
        (2, 2, 16, True, True, True, False),     # batch 2, token-index writes (reuse mode)
        (1, 2, 32, False, False, True, False),   # the backbone without PRoPE
        (1, 3, 128, True, False, False, False),  # the last prefill block: keys/values only
        (1, 2, 128, True, False, True, True),    # a rank's heads over several ranks: q, k come normalised
    ]:
        frames, hh, ww = 2, 2, 3
        length = frames * hh * ww
        q, k, v = (torch.randn(batch, length, heads * head_dim, dtype=bf16) * 3 for _ in range(3))
        w_q, w_k = torch.randn(heads * head_dim, dtype=bf16), torch.randn(heads * head_dim, dtype=bf16)
        rope = rope_tables(torch.tensor([3.0, 7.0]), hh, ww, head_dim)
        prope = None
        if prope_on:
            rot = torch.linalg.qr(torch.randn(batch, frames, 3, 3))[0]
            view = torch.eye(4).repeat(batch, frames, 1, 1)
            view[..., :3, :3], view[..., :3, 3] = rot, torch.randn(batch, frames, 3)
            intr = torch.tensor([[0.9, 0, 0.5], [0, 1.2, 0.5], [0, 0, 1]]).expand(batch, frames, 3, 3)
            prope = PRoPE.from_cameras(view, intr, bf16)
        branches = 2 if prope_on else 1
        write = torch.randperm(length + 5)[:length] if indexed else slice(4, 4 + length)
        outs = []
        for fn in (rotate_and_store_reference, lambda *a: rotate_and_store(*a, kernel=kernel)):
            buffers = tuple(torch.full((branches * batch, length + 5, heads, head_dim), 7.0, dtype=bf16)
                            for _ in range(2))
            weights = (None, None) if normed else (w_q, w_k)
            q_all = fn(q if with_q else None, k, v, *weights, 1e-6, rope, prope, buffers, write, heads)
            outs.append((q_all, *buffers))
        for name, ref, got in zip(("q", "k buffer", "v buffer"), *outs):
            if ref is None and got is None:
                continue
            if not torch.equal(ref, got):
                diff = (ref.float() - got.float()).abs()
                failures.append(f"{name} {batch=} {heads=} {head_dim=}: {int((diff > 0).sum())} differ, max {diff.max()}")
    if failures:
        raise SystemExit("\\n".join(failures))
    print("ok")
""")


def test_triton_kernel_equals_the_reference():
    """Bit for bit: the kernel rounds at the reference's points (to bf16, ties to even), and
    the interpreter computes in float32 like the GPU. The buffer slots that are not written
    must keep their contents (filled with 7s)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


def test_kernel_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="bfloat16"):
        rotate_and_store(None, torch.zeros(1, 4, 8), torch.zeros(1, 4, 8), None, torch.ones(8), 1e-6,
                         (torch.ones(4, 2), torch.zeros(4, 2)), None, (torch.zeros(1, 4, 2, 4),) * 2, slice(0, 4), 2,
                         kernel=object())
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        rotate_and_store(None, torch.zeros(1, 4, 24, dtype=torch.bfloat16), torch.zeros(1, 4, 24, dtype=torch.bfloat16),
                         None, torch.ones(24), 1e-6, (torch.ones(4, 6), torch.zeros(4, 6)), None,
                         (torch.zeros(1, 4, 2, 12, dtype=torch.bfloat16),) * 2, slice(0, 4), 2, kernel=object())


def test_linear_gelu_tanh_is_the_tanh_gelu_of_the_linear():
    x, w, b = torch.randn(2, 5, 8), torch.randn(16, 8), torch.randn(16)
    ref = torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b), approximate="tanh")
    torch.testing.assert_close(linear_gelu_tanh(x, w, b), ref, rtol=0, atol=0)
    compiled = torch.compile(lambda x, w, b: linear_gelu_tanh(x, w, b), dynamic=False)
    torch.testing.assert_close(compiled(x, w, b), ref)


@pytest.mark.parametrize("accel", ["eager", "compile"])
def test_rollout_with_fused_kernels_equals_without_on_the_cpu(accel, monkeypatch):
    """On the CPU the fused paths run the reference code through the fused call structure
    (the eager island, the store-only last block, the custom GELU op). Eagerly that is
    bit-identical to the unfused rollout. Compiled, the unfused blocks let inductor fuse the
    norm/RoPE/PRoPE work (it skips some intermediate bf16 roundings) while the fused path keeps
    the eager roundings, so the steady chunks differ by rounding only."""
    pipe, image, text = tiny_pipeline_inputs(torch.bfloat16)
    traj = trajectory_from_pose_string("w-23")
    import worldplay.nn.dit as dit_module

    calls = {"store": 0, "gelu": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(dit_module, "rotate_and_store", counted("store", dit_module.rotate_and_store))
    monkeypatch.setattr(dit_module, "linear_gelu_tanh", counted("gelu", dit_module.linear_gelu_tanh))
    runs = {}
    for fused in (False, True):
        settings = RolloutSettings(num_chunk=6, noise_latents=24, accel=accel, fused_kernels=fused)
        runs[fused] = list(pipe.rollout(image, text, traj, settings))
    assert calls["store"] > 0 and (calls["gelu"] > 0 or accel == "compile")  # the fused paths ran
    if accel == "eager":
        for a, b in zip(runs[True], runs[False], strict=True):
            assert torch.equal(a.latents, b.latents) and torch.equal(a.frames, b.frames)
        return
    assert pipe.last_accel_stats.compiled_calls > 0 and pipe.last_accel_stats.recompiles == 0
    errs = [((a.latents - b.latents).norm() / b.latents.norm()).item() for a, b in zip(runs[True], runs[False], strict=True)]
    assert errs[:4] == [0.0] * 4 and max(errs[4:]) < 0.015, errs
