"""3-D rotary position embedding of the Wan DiT (interleaved pairs, 44/42/42 split at d=128).

The temporal coordinate is an explicit per-frame position instead of the frame's index in the
call: HY-WorldPlay places memory frames and the generated chunk on *slot* positions
(see ``worldplay.memory``), and one rule for both is what keeps the video smooth.
"""

from __future__ import annotations

import torch


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Feature split of one head over (time, height, width): 44/42/42 for 128."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_angles(positions: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """Angles ``pos * theta^(-2j/dim)`` for the dim/2 pairs of one axis, in float64."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device)[: dim // 2] / dim
    inv_freq = 1.0 / (theta**exponents)
    return positions.to(torch.float64)[:, None] * inv_freq[None, :]


def rope_tables(
    frame_positions: torch.Tensor,
    height: int,
    width: int,
    head_dim: int,
    theta: float = 10000.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[F*height*width, head_dim/2]`` (float32) for frame-major tokens.

    ``frame_positions`` gives the temporal RoPE position of each of the F frames (any real
    numbers; integers in practice). Angles are formed in float64 and rounded once to float32,
    as the official code does with its precomputed table.
    """
    t_dim, h_dim, w_dim = rope_axis_dims(head_dim)
    device = frame_positions.device
    num_frames = frame_positions.numel()
    ang_t = _axis_angles(frame_positions.reshape(-1), t_dim, theta)
    ang_h = _axis_angles(torch.arange(height, device=device), h_dim, theta)
    ang_w = _axis_angles(torch.arange(width, device=device), w_dim, theta)
    angles = torch.cat(
        [
            ang_t[:, None, None, :].expand(num_frames, height, width, -1),
            ang_h[None, :, None, :].expand(num_frames, height, width, -1),
            ang_w[None, None, :, :].expand(num_frames, height, width, -1),
        ],
        dim=-1,
    ).reshape(num_frames * height * width, head_dim // 2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent feature pairs of ``x [B, L, H, d]`` by the tables ``[L, d/2]``.

    Computed in float32 and rounded back to ``x``'s dtype (the official precision).
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    out = torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)
    return out.to(x.dtype)


def temporal_rotation_tables(
    deltas: torch.Tensor, tokens_per_frame: int, head_dim: int, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[F*tokens_per_frame, head_dim/2]`` that move keys by ``deltas[f]``
    temporal positions and leave the height/width features alone.

    RoPE rotations compose (``R(a) R(b) = R(a + b)``), so a key rotated at position ``p`` and
    then by ``delta`` equals the key rotated at ``p + delta`` up to rounding.
    """
    t_dim, h_dim, w_dim = rope_axis_dims(head_dim)
    ang_t = _axis_angles(deltas.reshape(-1), t_dim, theta)  # [F, t_dim/2]
    zeros = torch.zeros(ang_t.shape[0], (h_dim + w_dim) // 2, dtype=ang_t.dtype, device=ang_t.device)
    angles = torch.cat([ang_t, zeros], dim=-1).repeat_interleave(tokens_per_frame, dim=0)
    return angles.cos().float(), angles.sin().float()


def rotate_temporal(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rope` with tables from :func:`temporal_rotation_tables`, touching only the
    temporal features (the others would be rotated by angle 0, which is exact): ``x [..., L, H, d]``,
    tables ``[L, t_dim/2]`` or ``[L, d/2]``, or one row per frame ``[F, 1, d/2]`` against
    ``x [..., F, S, H, d]`` (broadcast over the frame's tokens); rotated in place and returned."""
    t_half = rope_axis_dims(x.shape[-1])[0] // 2
    c = cos[..., :t_half][:, None, :]
    s = sin[..., :t_half][:, None, :]
    pairs = x[..., : 2 * t_half].float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    x[..., : 2 * t_half] = torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2).to(x.dtype)
    return x
