"""The DiT over N ranks: Ulysses sequence parallelism (DeepSpeed-Ulysses), token-sharded
everywhere except inside self-attention.

Each rank holds the same slice of every latent frame's tokens (tokens ``s0..s1`` of the
frame's ``S``): per-frame modulation, PRoPE's per-frame output transform, the cross-attention
(its queries against the full text keys/values each rank holds) and the FFN need nothing from
the other ranks. Around self-attention two all-to-alls change the split:

* in: q, k, v of this rank's tokens, all heads -> every token of the call, this rank's
  ``H/N`` heads (q and k already RMS-normalised: Wan's q/k norm spans all heads of a token);
  RoPE and PRoPE then run on the heads a rank holds, on the way into its K/V buffer, which
  holds every token for those heads (the memory K/V is sharded by heads and never moves);
* out: both branches' attention output back to this rank's tokens, all heads.

Why not ring attention: a chunk's 3,520 queries attend to 17,600 keys (16 memory latents and the
chunk). Ring attention passes the keys/values around: (N-1)/N of both branches' K and V per
layer and call, 5x the queries' bytes. Ulysses moves q, k, v once and the output back, and the
memory K/V, 4/5 of the keys, stays where it was written. :mod:`worldplay.ranks.traffic` counts
both.

The pieces: a rank's tokens are consecutive within a frame, so one call's tokens reach it as
one block per rank and frame; the block order is restored by one copy (``_interleave``).
"""

from __future__ import annotations

import torch

from .group import RankGroup
from .split import balanced_split, starts

PURPOSE = "dit"


class SequenceShards:
    """Rank ``group.rank``'s tokens of every frame (``tokens_per_frame`` split evenly) and the
    exchanges of :mod:`worldplay.nn.dit`'s attention step."""

    def __init__(self, group: RankGroup, tokens_per_frame: int, heads: int):
        check_heads(heads, group.size)
        if tokens_per_frame < group.size:
            raise ValueError(f"{tokens_per_frame} tokens per latent frame cannot be shared by {group.size} ranks")
        self.group = group
        self.tokens_per_frame = tokens_per_frame
        self.sizes = balanced_split(tokens_per_frame, group.size)
        self.offsets = starts(self.sizes)
        self.heads = heads

    @property
    def size(self) -> int:
        return self.group.size

    @property
    def local_tokens(self) -> int:
        """This rank's tokens per frame."""
        return self.sizes[self.group.rank]

    def _frames(self, length: int) -> int:
        frames, rest = divmod(length, self.tokens_per_frame)
        if rest:
            raise ValueError(f"{length} tokens are not whole frames of {self.tokens_per_frame}")
        return frames

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of frame-major ``x`` (``dim`` holds ``F * S`` tokens)."""
        dim %= x.ndim
        frames = self._frames(x.shape[dim])
        r = self.group.rank
        framed = x.unflatten(dim, (frames, self.tokens_per_frame))
        return framed.narrow(dim + 1, self.offsets[r], self.sizes[r]).flatten(dim, dim + 1)

    def local(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's entries of a per-token ``dim`` of ``S`` entries (per-token modulation)."""
        r = self.group.rank
        return t.narrow(dim, self.offsets[r], self.sizes[r])

    def to_heads(self, tensors: list[torch.Tensor], heads: int) -> list[torch.Tensor]:
        """``[B, F*s, H*d]`` of this rank's tokens (each of ``tensors``) -> ``[B, F*S, (H/N)*d]``:
        every token, this rank's heads ``r*H/N .. (r+1)*H/N - 1``. One all-to-all for all of them."""
        n = self.size
        count = len(tensors)
        batch, local_len, width = tensors[0].shape
        frames = local_len // self.local_tokens
        head_dim = width // heads
        per_rank = heads // n
        # [count, B, F, s, N, H/N, d] -> destination rank first
        stacked = torch.stack(tensors).view(count, batch, frames, self.local_tokens, n, per_rank, head_dim)
        send = stacked.permute(4, 0, 1, 2, 3, 5, 6).contiguous().view(-1)
        block = count * batch * frames * per_rank * head_dim  # elements per token of the frame
        got = self.group.all_to_all(send, [block * self.local_tokens] * n, [block * s for s in self.sizes], PURPOSE)
        pieces = [got[block * a: block * b].view(count, batch, frames, s, per_rank * head_dim)
                  for a, b, s in zip(self.offsets, self.offsets[1:], self.sizes, strict=False)]
        full = torch.cat(pieces, dim=3).view(count, batch, frames * self.tokens_per_frame, per_rank * head_dim)
        return list(full.unbind(0))

    def to_tokens(self, o: torch.Tensor) -> torch.Tensor:
        """``[R, F*S, H/N, d]`` (every token, this rank's heads; R rows: branches x batch) ->
        ``[R, F*s, H, d]`` (this rank's tokens, every head)."""
        n = self.size
        rows, length, per_rank, head_dim = o.shape
        frames = self._frames(length)
        framed = o.view(rows, frames, self.tokens_per_frame, per_rank, head_dim)
        send = torch.cat([framed[:, :, a:b].reshape(-1) for a, b in zip(self.offsets, self.offsets[1:], strict=False)])
        block = rows * frames * per_rank * head_dim
        got = self.group.all_to_all(send, [block * s for s in self.sizes], [block * self.local_tokens] * n, PURPOSE)
        # [N (source rank = head group), R, F, s, H/N, d] -> [R, F, s, N, H/N, d]
        got = got.view(n, rows, frames, self.local_tokens, per_rank, head_dim).permute(1, 2, 3, 0, 4, 5)
        return got.reshape(rows, frames * self.local_tokens, n * per_rank, head_dim)

    def gather(self, out: torch.Tensor) -> torch.Tensor:
        """``[B, F*s, C]`` of this rank's tokens -> ``[B, F*S, C]`` on every rank (the DiT's
        output before unpatchify)."""
        batch, local_len, channels = out.shape
        frames = local_len // self.local_tokens
        framed = out.view(batch, frames, self.local_tokens, channels)
        return self.group.gather_along(framed, 2, self.sizes, PURPOSE).reshape(batch, -1, channels)


def check_heads(heads: int, ranks: int) -> None:
    """The one rule for how many ranks the DiT's attention heads allow."""
    if heads % ranks:
        divisors = [n for n in range(1, heads + 1) if heads % n == 0]
        raise ValueError(f"the DiT's {heads} attention heads do not split over {ranks} ranks; use a number of "
                         f"ranks that divides {heads}: {', '.join(map(str, divisors))}")
