"""The two places where the models meet several ranks, as interfaces: on one rank there is no
object (None) and the models run their single-device code unchanged.

:mod:`worldplay.ranks` implements both over ``torch.distributed``; the models never import it.

* :class:`TokenShards` (the DiT, :mod:`worldplay.nn.dit`): which of a frame's tokens this rank
  holds, and the exchanges around self-attention (tokens <-> heads) and at the output.
* :class:`ColumnShards` (the VAE decoder, :mod:`worldplay.nn.vae`): which latent columns this
  rank decodes, the halo every 3-wide spatial convolution needs from the neighbouring ranks (in
  place of the zero padding at the split), and the gather of a whole frame's keys and values
  for the decoder's per-frame attention.
"""

from __future__ import annotations

from typing import Protocol

import torch


class TokenShards(Protocol):
    size: int  # ranks
    tokens_per_frame: int

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of frame-major ``x`` (``dim``: ``F * S`` tokens)."""

    def local(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's entries of a per-token ``dim`` of ``S`` entries."""

    def to_heads(self, tensors: list[torch.Tensor], heads: int) -> list[torch.Tensor]:
        """``[B, F*s, H*d]`` (this rank's tokens) -> ``[B, F*S, (H/N)*d]`` (this rank's heads)."""

    def to_tokens(self, o: torch.Tensor) -> torch.Tensor:
        """``[R, F*S, H/N, d]`` -> ``[R, F*s, H, d]``."""

    def gather(self, out: torch.Tensor) -> torch.Tensor:
        """``[B, F*s, C]`` -> ``[B, F*S, C]`` on every rank."""


class ColumnShards(Protocol):
    size: int

    def width(self, level: int) -> int:
        """This rank's columns at ``level`` (the latent grid times ``2**level``)."""

    def take(self, latents: torch.Tensor) -> torch.Tensor:
        """This rank's latent columns of ``[..., W]``."""

    def halo(self, x: torch.Tensor, pad: int) -> torch.Tensor:
        """``[..., w]`` -> ``[..., pad + w + pad]``: the neighbours' edge columns, zeros at the
        frame's edges (what the convolution's own zero padding gives on one rank)."""

    def gather(self, t: torch.Tensor, dim: int, level: int) -> torch.Tensor:
        """This rank's columns of ``t`` along ``dim`` at ``level`` -> the whole width."""
