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

# "sdpa" lets PyTorch's dispatcher pick; the others pin one SDPA kernel. "fa4" is the CuTe-DSL
# FlashAttention of the optional ``flash-attn-4`` package (Hopper and Blackwell), outside SDPA.
BACKENDS: dict[str, tuple[SDPBackend, ...] | None] = {
    "sdpa": None,
    "fa4": None,
    "cudnn": (SDPBackend.CUDNN_ATTENTION,),
    "flash": (SDPBackend.FLASH_ATTENTION,),
    "efficient": (SDPBackend.EFFICIENT_ATTENTION,),
    "math": (SDPBackend.MATH,),
}


def fa4_version() -> str | None:
    """The installed flash-attn-4 version, or None (the package is optional)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flash-attn-4")
    except PackageNotFoundError:
        return None


def fa4_usable() -> bool:
    """flash-attn-4 imports and the current GPU is one it has kernels for (Hopper, Blackwell)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] not in (9, 10, 11):
        return False
    try:
        import flash_attn.cute.interface  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


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
    if check_backend(backend) == "fa4":
        if mask is not None:
            raise ValueError("the fa4 attention backend takes no mask; use an SDPA backend")
        # FlashAttention takes [B, L, H, d]; ours are transposed views of exactly that layout.
        return fa4_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    kernels = BACKENDS[backend]
    ctx = sdpa_kernel(list(kernels)) if kernels is not None else contextlib.nullcontext()
    with ctx:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)


@torch.library.custom_op("worldplay::fa4_attention", mutates_args=())
def fa4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[B, L, H, d]`` softmax attention by flash-attn-4; an opaque op to ``torch.compile``
    (its kernels are compiled by the CuTe DSL at first call, outside any CUDA-graph capture)."""
    try:
        from flash_attn.cute.interface import flash_attn_func
    except ImportError as exc:  # the package is optional
        raise RuntimeError(
            "attention backend 'fa4' needs the flash-attn-4 package (pip install flash-attn-4, "
            "a Hopper or Blackwell GPU); or choose 'cudnn'"
        ) from exc
    out = flash_attn_func(q, k, v)
    return (out[0] if isinstance(out, tuple) else out).contiguous()


@fa4_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape[:-1] + v.shape[-1:])
