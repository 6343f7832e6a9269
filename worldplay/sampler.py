"""The distilled 4-step flow-matching Euler sampler of HY-WorldPlay WAN-5B.

Timesteps are kept in float32 (888.8889 and 727.2728 are not representable in bf16); the update
``x + (sigma_next - sigma) * v`` runs on the bf16 latents with the step size as a float32 host
scalar, exactly as the official pipeline computes it (a bf16 step size would change the result).
"""

from __future__ import annotations

import torch

# t = 1000, 960, 888.8889, 727.2728 -> 0: the shift-8 warp of a uniform 4-step grid.
DISTILLED_TIMESTEPS: tuple[float, ...] = (1000.0, 960.0, 888.8889, 727.2728, 0.0)


def distilled_schedule() -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, sigmas) as float32 CPU tensors of length 5 (the last is the clean end)."""
    timesteps = torch.tensor(DISTILLED_TIMESTEPS, dtype=torch.float32)
    return timesteps, timesteps / 1000.0


def euler_step(x: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One flow-matching Euler step. ``sigma``/``sigma_next`` are float32 0-dim CPU tensors, so
    the step size enters as a float32 scalar (not rounded to the latents' dtype)."""
    dt = sigma_next - sigma
    return x + dt * velocity
