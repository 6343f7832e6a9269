"""PRoPE camera conditioning: per-frame projective transforms of q, k, v and the attention output.

For a frame with world-to-camera matrix ``W`` and intrinsics ``K`` (principal point dropped),
``P = lift(K) @ W`` maps world to image. Every group of 4 consecutive head features is
multiplied by a 4x4 matrix: queries by ``P^T``, keys and values by ``P^-1``, the attention
output by ``P`` of the query's frame. The logit between frames i and j then depends on
``P_i P_j^-1`` only — the relative camera transform.

The official code computes the matrices in the model dtype (bf16) from absolute poses; the
same op order is kept here so that the matrices match bit for bit when ``dtype`` is bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _lift(k3: torch.Tensor) -> torch.Tensor:
    """3x3 -> 4x4 with a 1 in the corner."""
    out = torch.zeros(k3.shape[:-2] + (4, 4), device=k3.device, dtype=k3.dtype)
    out[..., :3, :3] = k3
    out[..., 3, 3] = 1.0
    return out


def _focal_only(ks: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(ks)
    out[..., 0, 0] = ks[..., 0, 0]
    out[..., 1, 1] = ks[..., 1, 1]
    out[..., 2, 2] = 1.0
    return out


def _invert_focal(ks: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(ks)
    out[..., 0, 0] = 1.0 / ks[..., 0, 0]
    out[..., 1, 1] = 1.0 / ks[..., 1, 1]
    out[..., 0, 2] = -ks[..., 0, 2] / ks[..., 0, 0]
    out[..., 1, 2] = -ks[..., 1, 2] / ks[..., 1, 1]
    out[..., 2, 2] = 1.0
    return out


def _invert_rigid(w: torch.Tensor) -> torch.Tensor:
    """Inverse of ``[R t; 0 1]`` as ``[R^T, -R^T t]`` (no general matrix inverse)."""
    r_inv = w[..., :3, :3].transpose(-1, -2)
    out = torch.zeros_like(w)
    out[..., :3, :3] = r_inv
    out[..., :3, 3] = -(r_inv @ w[..., :3, 3:4]).squeeze(-1)
    out[..., 3, 3] = 1.0
    return out


@dataclass
class PRoPE:
    """The three per-frame matrices ``[B, F, 4, 4]`` of one call."""

    q: torch.Tensor  # P^T
    kv: torch.Tensor  # P^-1
    o: torch.Tensor  # P

    @classmethod
    def from_cameras(cls, viewmats: torch.Tensor, intrinsics: torch.Tensor, dtype: torch.dtype) -> PRoPE:
        """``viewmats [B, F, 4, 4]`` (world-to-camera), ``intrinsics [B, F, 3, 3]`` (normalised)."""
        w = viewmats.to(dtype)
        ks = _focal_only(intrinsics.to(dtype))
        p = _lift(ks) @ w
        p_inv = _invert_rigid(w) @ _lift(_invert_focal(ks))
        # Contiguous once here: the fused kernel reads them per layer (worldplay.nn.fused).
        return cls(q=p.transpose(-1, -2).contiguous(), kv=p_inv, o=p)


def apply_per_frame(x: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """``x [B, F*S, H, d]``: multiply every 4-feature group of frame f's tokens by ``matrices[:, f]``."""
    b, length, heads, d = x.shape
    frames = matrices.shape[1]
    groups = x.reshape(b, frames, length // frames, heads, d // 4, 4)
    if torch.compiler.is_compiling():
        # Inside a compiled graph the 16 multiply-adds fuse with the neighbouring elementwise
        # work into one pass; as a matmul they would be a separate tiny-batched GEMM launch.
        # Float32 accumulation and one rounding, as the tensor-core matmul does.
        m32 = matrices.float()[:, :, None, None, None]  # [B, F, 1, 1, 1, 4, 4]
        out = (groups.float().unsqueeze(-2) * m32).sum(-1)
        return out.to(x.dtype).reshape(b, length, heads, d)
    m = matrices.to(x.dtype)[:, :, None, None]  # [B, F, 1, 1, 4, 4]
    return (groups @ m.transpose(-1, -2)).reshape(b, length, heads, d)
