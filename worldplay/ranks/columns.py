"""The VAE decode over N ranks: each rank decodes a band of latent columns, exactly.

Why columns: at 704x1280 the latent grid is 44 x 80; 80 columns divide evenly over 1, 2, 4, 5
and 8 ranks (44 rows only over 1, 2 and 4), and a column halo is a frame's height (704 pixels at
the top) where a row halo would be its width (1280). The official code splits the same way.

The decoder's spatial work is local but for the 3-wide convolutions, which read one column past
each side (``ColumnShards.halo``, exchanged with the neighbours in one all-to-all), and the
middle block's per-frame attention, which gathers the keys and values of the whole frame. Upsampling
doubles the columns of every rank (the split stays aligned), so a rank's columns at level ``l``
are its latent columns times ``2**l`` and its pixel columns its latent columns times 16.
"""

from __future__ import annotations

import torch

from .group import RankGroup
from .split import balanced_split, starts

PURPOSE = "decode"
PIXEL_LEVEL = 4  # pixels per latent column: 2**4 = 16


class ColumnShards:
    """Rank ``group.rank``'s latent columns of a ``latent_width``-wide grid (split evenly)."""

    def __init__(self, group: RankGroup, latent_width: int):
        if latent_width < group.size:
            raise ValueError(f"a {latent_width}-column latent grid cannot be decoded by {group.size} ranks "
                             f"(at least one latent column each); use a wider image or fewer ranks")
        self.group = group
        self.latent_width = latent_width
        self.sizes = balanced_split(latent_width, group.size)
        self.offsets = starts(self.sizes)

    @property
    def size(self) -> int:
        return self.group.size

    def width(self, level: int) -> int:
        return self.sizes[self.group.rank] << level

    def take(self, latents: torch.Tensor) -> torch.Tensor:
        r = self.group.rank
        return latents[..., self.offsets[r]: self.offsets[r + 1]]

    # Eager (a graph break of a compiled decoder): the exchange is a blocking collective.
    @torch.compiler.disable
    def halo(self, x: torch.Tensor, pad: int) -> torch.Tensor:
        layout = _layout(x)
        left, right = self.group.exchange_edges(x[..., :pad].contiguous(), x[..., -pad:].contiguous(), PURPOSE)
        zeros = None
        if left is None or right is None:
            shape = (*x.shape[:-1], pad)
            zeros = x.new_zeros(shape)
        parts = [zeros if left is None else left, x, zeros if right is None else right]
        return torch.cat(parts, dim=-1).contiguous(memory_format=layout)

    @torch.compiler.disable
    def gather(self, t: torch.Tensor, dim: int, level: int) -> torch.Tensor:
        return self.group.gather_along(t, dim, tuple(s << level for s in self.sizes), PURPOSE)

    def gather_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 ``[T, H, w, 3]`` of this rank's pixel columns -> the whole frames."""
        return self.gather(frames, 2, PIXEL_LEVEL)


def _layout(x: torch.Tensor) -> torch.memory_format:
    """The layout of a decoder activation (channels-last for the fast decoder, else contiguous)."""
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format
