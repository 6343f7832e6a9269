"""FLOP floors: the arithmetic each rollout stage must do, and the card's measured matmul rate.

DiT counts follow spec ``dit.md`` section 9 (1 multiply-add = 2 FLOPs), for any preset,
resolution, memory size and text length:

* linear layers per token and layer: self-attention q/k/v/o ``4 D^2``, PRoPE output projection
  ``D^2``, cross-attention q/o ``2 D^2``, FFN ``2 D F`` multiply-adds; patch embedding per
  token; the output head per token only where its output is used (denoising steps, not the
  prefill);
* self-attention per layer: ``4 D Lq Lk`` per branch, two branches (RoPE and PRoPE);
* cross-attention per layer: ``4 D Lq Ltext``.
  Text K/V projections (computed once per rollout here) are not counted.

VAE decode counts come from ``torch.utils.flop_counter.FlopCounterMode`` running the decoder on
the meta device (no memory, no time): the first latent of a stream (1 frame) and a steady
latent (4 frames) at the requested resolution.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import torch

from ..config import DiTConfig, dit_preset, vae_preset
from ..constants import CHUNK_LATENTS, DENOISING_STEPS, MEMORY_SLOTS

log = logging.getLogger(__name__)



def memory_latents(chunk: int) -> int:
    """Memory latents attended by chunk ``chunk`` (all earlier ones up to 16: 0, 4, 8, 12, 16, ...)."""
    return min(CHUNK_LATENTS * chunk, MEMORY_SLOTS)


def dit_forward_flops(cfg: DiTConfig, q_tokens: int, k_tokens: int, text_tokens: int, *,
                      head: bool = True) -> dict[str, float]:
    """FLOPs of one DiT forward over ``q_tokens`` queries attending to ``k_tokens`` keys."""
    d, f, layers = cfg.dim, cfg.ffn_dim, cfg.num_layers
    patch = cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
    per_token_layer = 2 * (7 * d * d + 2 * d * f)
    embed = 2 * cfg.in_channels * patch * d + (2 * d * cfg.out_channels * patch if head else 0)
    linear = q_tokens * (layers * per_token_layer + embed)
    attention = layers * 2 * 4 * d * q_tokens * k_tokens
    cross = layers * 4 * d * q_tokens * text_tokens
    return {"linear": float(linear), "attention": float(attention), "cross": float(cross),
            "total": float(linear + attention + cross)}


def dit_chunk_flops(cfg: DiTConfig, tokens_per_latent: int, chunk: int, text_tokens: int) -> dict[str, float]:
    """``prefill`` (0 for chunk 0) and one denoising ``step`` of chunk ``chunk``."""
    n_mem = memory_latents(chunk)
    mem_tokens = n_mem * tokens_per_latent
    q_tokens = CHUNK_LATENTS * tokens_per_latent
    prefill = dit_forward_flops(cfg, mem_tokens, mem_tokens, text_tokens, head=False)["total"] if n_mem else 0.0
    step = dit_forward_flops(cfg, q_tokens, mem_tokens + q_tokens, text_tokens)["total"]
    return {"prefill": prefill, "step": step}


@functools.lru_cache(maxsize=16)
def vae_decode_flops(preset: str, height: int, width: int) -> tuple[float, float]:
    """(first latent of a stream, steady latent) decode FLOPs, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..nn.vae import WanVAE

    cfg = vae_preset(preset)
    lh, lw = height // cfg.scale_factor_spatial, width // cfg.scale_factor_spatial
    with torch.device("meta"):
        vae = WanVAE(cfg)
    state = vae.new_decode_state(1, lh, lw, device="meta", dtype=torch.float32)
    latent = torch.zeros(1, cfg.z_dim, 1, lh, lw, device="meta")
    counts = []
    for _ in range(2):
        with FlopCounterMode(display=False) as counter:
            vae.decode(latent, state)
        counts.append(float(counter.get_total_flops()))
    return counts[0], counts[1]


def stage_flops(preset: str, height: int, width: int, chunk: int, text_tokens: int) -> dict[str, float]:
    """FLOPs of each timed stage of chunk ``chunk``: prefill, step0..3, steps, dit, decode, total."""
    cfg = dit_preset(preset)
    spatial = vae_preset(preset).scale_factor_spatial
    tokens_per_latent = (height // spatial // 2) * (width // spatial // 2)
    dit = dit_chunk_flops(cfg, tokens_per_latent, chunk, text_tokens)
    first, steady = vae_decode_flops(preset, height, width)
    decode = (first + (CHUNK_LATENTS - 1) * steady) if chunk == 0 else CHUNK_LATENTS * steady
    out: dict[str, float] = {"select": 0.0}
    if chunk:
        out["prefill"] = dit["prefill"]
    for s in range(DENOISING_STEPS):
        out[f"step{s}"] = dit["step"]
    out["steps"] = DENOISING_STEPS * dit["step"]
    out["dit"] = out["steps"] + dit["prefill"]
    out["decode"] = decode
    out["total"] = out["dit"] + decode
    return out


def measure_matmul_rate(device: torch.device, repeats: int = 10) -> dict[str, Any]:
    """The card's matmul rate, measured now: bf16 8192^3 with CUDA events on a GPU; on the CPU
    a float32 1024^3 matmul with perf_counter (labelled as such; CPU floors are indicative)."""
    if device.type == "cuda":
        n, dtype = 8192, torch.bfloat16
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        label = f"cuda bf16 matmul {n}^3 (CUDA events)"
        del a, b
        torch.cuda.empty_cache()
    else:
        n, dtype = 1024, torch.float32
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        label = f"cpu float32 matmul {n}^3 (perf_counter, {torch.get_num_threads()} threads)"
    flop = 2.0 * n**3
    rates = sorted(flop / t / 1e12 for t in times)
    return {"label": label, "median_tflops": round(rates[len(rates) // 2], 4), "best_tflops": round(rates[-1], 4),
            "samples": len(rates)}
