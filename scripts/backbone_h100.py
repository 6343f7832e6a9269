"""Backbone measurements at full size on one GPU (the backbone issue's H100 numbers).

Builds the wan5b DiT and VAE with seeded random init directly in bf16 on the GPU and reports:
parameter counts, peak memory, the time of one DiT forward over a 4-latent chunk at 704x1280
(3,520 tokens, 512 text tokens), the time of one streaming VAE decode of a 4-latent chunk, the
card's bf16 matmul rate, and parity with diffusers (same weights, bf16) next to diffusers' own
backend-to-backend spread.

Run on the GPU machine (diffusers only for the parity leg):
    PYTHONPATH=. python scripts/backbone_h100.py --out results.json
Random weights: timings are valid, parity is valid (same weights both sides); the outputs are
not pictures of anything.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, ".")

from worldplay.checkpoint import build_on_device, random_init_  # noqa: E402
from worldplay.config import DIT_PRESETS, VAE_PRESETS  # noqa: E402
from worldplay.nn.dit import WanDiT  # noqa: E402


def cuda_time_ms(fn, warmup: int = 3, reps: int = 10) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def summary(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "n": len(times)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def matmul_rate() -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = statistics.median(cuda_time_ms(lambda: a @ b, warmup=5, reps=20))
    return 2 * n**3 / (t / 1e3) / 1e12


def measure_dit(results: dict, parity: bool) -> None:
    dev = "cuda"
    cfg = DIT_PRESETS["wan5b"]
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    dit = build_on_device(lambda: WanDiT(cfg), dev, torch.bfloat16)
    random_init_(dit, seed=0)
    torch.cuda.synchronize()
    results["dit_build_s"] = time.perf_counter() - t0
    results["dit_params"] = sum(p.numel() for p in dit.parameters())
    results["dit_weights_gib"] = torch.cuda.memory_allocated() / 2**30

    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(1, 48, 4, 44, 80, device=dev, dtype=torch.bfloat16, generator=g)
    text = torch.randn(1, 512, 4096, device=dev, dtype=torch.bfloat16, generator=g)
    t = torch.tensor([[14.0, 1000.0, 1000.0, 1000.0]], device=dev)
    with torch.no_grad():
        ctx = dit.text_context(text)
        for backend in ("sdpa", "cudnn", "flash"):
            times = cuda_time_ms(lambda b=backend: dit(x, t, ctx, attention_backend=b))
            results[f"dit_forward_{backend}"] = summary(times)
        # The whole forward including the text MLP + cross K/V (what a plain diffusers call does).
        results["dit_forward_with_text_sdpa"] = summary(cuda_time_ms(lambda: dit(x, t, text)))
    results["dit_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30

    if parity:
        import diffusers

        with torch.device("meta"):
            ref = diffusers.WanTransformer3DModel(**cfg.to_dict())
        ref = ref.to_empty(device=dev).to(torch.bfloat16).eval()
        ref.load_state_dict(dit.state_dict(), strict=True)
        # Non-persistent RoPE tables are lost on the meta device: rebuild them (float32, as
        # diffusers keeps them when loading with torch_dtype=bfloat16).
        ref.rope = type(ref.rope)(cfg.attention_head_dim, cfg.patch_size, cfg.rope_max_seq_len).to(dev)
        tokens = t.repeat_interleave(880, dim=1)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with torch.no_grad():
            ours = {b: dit(x, t, ctx, attention_backend=b) for b in ("cudnn", "flash")}
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                ref_cudnn = ref(x, tokens, text, return_dict=False)[0]
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                ref_flash = ref(x, tokens, text, return_dict=False)[0]
            ref_again = None
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                ref_again = ref(x, tokens, text, return_dict=False)[0]
            # float32 reference (same weights upcast): who is closer to exact?
            ref32 = ref.float()
            exact = ref32(x.float(), tokens, text.float(), return_dict=False)[0]
            ref_cudnn_err = rel_err(ref_cudnn, exact)
            ours_err = rel_err(ours["cudnn"], exact)
        results["dit_parity"] = {
            "ours_bf16_vs_float32_reference": ours_err,
            "diffusers_bf16_vs_float32_reference": ref_cudnn_err,
            "ours_cudnn_vs_diffusers_cudnn": rel_err(ours["cudnn"], ref_cudnn),
            "ours_flash_vs_diffusers_flash": rel_err(ours["flash"], ref_flash),
            "diffusers_flash_vs_diffusers_cudnn (backend spread)": rel_err(ref_flash, ref_cudnn),
            "diffusers_cudnn_run_to_run": rel_err(ref_again, ref_cudnn),
            "ours_cudnn_vs_ours_flash": rel_err(ours["flash"], ours["cudnn"]),
        }
        del ref


def measure_vae(results: dict, parity: bool) -> None:
    from worldplay.nn.vae import WanVAE

    dev = "cuda"
    cfg = VAE_PRESETS["wan5b"]
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    vae = build_on_device(lambda: WanVAE(cfg), dev, torch.bfloat16).eval()
    random_init_(vae, seed=0)
    results["vae_params"] = sum(p.numel() for p in vae.parameters())
    results["vae_weights_gib"] = (torch.cuda.memory_allocated() - base) / 2**30
    g = torch.Generator(device=dev).manual_seed(2)
    latents = torch.randn(1, 48, 12, 44, 80, device=dev, generator=g)  # 3 chunks of 4 (normalised)
    state = vae.new_decode_state(1, 44, 80, device=dev, dtype=torch.bfloat16)
    results["vae_decode_cache_gib"] = state.nbytes / 2**30
    with torch.no_grad():
        chunk0 = vae.decode(latents[:, :, 0:4], state)
        results["vae_chunk0_frames"] = chunk0.shape[2]
        # Steady state: keep decoding the same 4 latents into the running stream.
        steady = latents[:, :, 4:8]
        times = cuda_time_ms(lambda: vae.decode(steady, state), warmup=2, reps=6)
        results["vae_decode_chunk"] = summary(times)
        results["vae_decode_chunk_frames"] = vae.decode(steady, state).shape[2]
    results["vae_peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30

    if parity:
        import diffusers
        from diffusers.models.autoencoders import autoencoder_kl_wan as dwan

        with torch.device("meta"):
            ref = diffusers.AutoencoderKLWan(**{k: v for k, v in cfg.to_dict().items() if k != "_class_name"})
        ref = ref.to_empty(device=dev).to(torch.bfloat16).eval()
        ref.load_state_dict(vae.state_dict(), strict=True)
        assert not list(ref.buffers()), "AutoencoderKLWan grew buffers: rebuild them here"

        def hy_stream(z_norm: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
            # HY-WorldPlay's MyVAE: one latent per call, cache kept, first_chunk for latent 0.
            z = vae.denormalize_latents(z_norm.to(dtype))
            ref.clear_cache()
            outs = []
            for i in range(z.shape[2]):
                ref._conv_idx = [0]
                x = ref.post_quant_conv(z[:, :, i : i + 1])
                outs.append(ref.decoder(x, feat_cache=ref._feat_map, feat_idx=ref._conv_idx, first_chunk=(i == 0)))
            return dwan.unpatchify(torch.cat(outs, dim=2), patch_size=2).clamp(-1.0, 1.0)

        z = latents[:, :, :5]  # latent 0 (first-chunk rule) + one full 4-latent step
        with torch.no_grad():
            fresh = vae.new_decode_state(1, 44, 80, device=dev, dtype=torch.bfloat16)
            ours = torch.cat([vae.decode(z[:, :, :4], fresh), vae.decode(z[:, :, 4:5], fresh)], dim=2)
            torch.backends.cudnn.benchmark = False
            want = hy_stream(z)
            again = hy_stream(z)
            torch.backends.cudnn.benchmark = True
            other_algo = hy_stream(z)
            torch.backends.cudnn.benchmark = False
            ref.float()
            exact = hy_stream(z, torch.float32)
        results["vae_parity"] = {
            "ours_bf16_vs_float32_reference": rel_err(ours, exact),
            "diffusers_bf16_vs_float32_reference": rel_err(want, exact),
            "frames": ours.shape[2],
            "ours_vs_diffusers_hy_stream": rel_err(ours, want),
            "diffusers_run_to_run": rel_err(again, want),
            "diffusers_cudnn_benchmark_on_vs_off (algorithm spread)": rel_err(other_algo, want),
            "ours_vs_diffusers_mean_abs_uint8": ((ours.float() - want.float()).abs().mean() * 127.5).item(),
        }
        del ref


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    parser.add_argument("--no-parity", action="store_true")
    parser.add_argument("--skip-dit", action="store_true")
    parser.add_argument("--skip-vae", action="store_true")
    args = parser.parse_args()

    results: dict = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "weights": "random-init:0 (bf16, built on the GPU)",
        "resolution": "704x1280, 4 latents (3,520 tokens), 512 text tokens",
    }
    results["bf16_matmul_tflops_8192"] = matmul_rate()
    if not args.skip_dit:
        measure_dit(results, parity=not args.no_parity)
        torch.cuda.empty_cache()
    if not args.skip_vae:
        measure_vae(results, parity=not args.no_parity)
    text = json.dumps(results, indent=2, default=str)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
