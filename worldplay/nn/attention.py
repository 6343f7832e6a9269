"""One attention entry point with a named backend.

Every attention call of the DiT goes through :func:`attention`, so that switching kernels
(for a benchmark, or because a backend is missing on a machine) is one argument, and the
choice is recorded by name in experiment results.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# "sdpa" lets PyTorch's dispatcher pick; the others pin one SDPA kernel.
BACKENDS: dict[str, tuple[SDPBackend, ...] | None] = {
    "sdpa": None,
    "cudnn": (SDPBackend.CUDNN_ATTENTION,),
    "flash": (SDPBackend.FLASH_ATTENTION,),
    "efficient": (SDPBackend.EFFICIENT_ATTENTION,),
    "math": (SDPBackend.MATH,),
}


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(BACKENDS)}")
    return name


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: str = "sdpa",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Non-causal softmax attention, scale 1/sqrt(head_dim).

    Layout ``[B, H, L, d]`` for q, k and v (keys may be longer than queries). ``mask`` is an
    additive float mask or a boolean keep-mask broadcastable to ``[B, H, Lq, Lk]``.
    """
    kernels = BACKENDS[check_backend(backend)]
    ctx = sdpa_kernel(list(kernels)) if kernels is not None else contextlib.nullcontext()
    with ctx:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
