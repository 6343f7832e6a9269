"""One process's place among the ranks that run a session together, and the collectives the
models use (through :mod:`torch.distributed`: NCCL on GPUs, gloo on the CPU).

A group of one rank is the same object with collectives that are identities, so code that
gathers or agrees does not ask how many ranks there are. Every collective counts the bytes this
rank sends (``traffic``, by purpose), which the tests hold to the count of
:mod:`worldplay.ranks.traffic` (under CUDA-graph replays no Python runs and nothing is counted).
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist

from .split import starts


class RankGroup:
    """Rank ``rank`` of ``size`` on ``device``; ``process_group``: the torch.distributed group
    (None for one rank)."""

    def __init__(self, rank: int = 0, size: int = 1, device: torch.device | str = "cpu", process_group=None):
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} is not in 0..{size - 1}")
        if size > 1 and process_group is None:
            raise ValueError("a group of several ranks needs its torch.distributed process group")
        self.rank, self.size = rank, size
        self.device = torch.device(device)
        self.process_group = process_group
        self.traffic: Counter[str] = Counter()  # bytes sent by this rank, by purpose

    @property
    def leader(self) -> bool:
        """Rank 0 writes what the group produces (the MP4, the stats, bench records)."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"RankGroup(rank={self.rank}, size={self.size}, device={self.device})"

    # -- what the models of a session split over the ranks ---------------------------------

    def token_shards(self, tokens_per_frame: int, heads: int):
        """The DiT's share of this rank (:class:`~worldplay.ranks.sequence.SequenceShards`),
        or None for one rank; ValueError when the shapes do not split over the ranks."""
        from .sequence import SequenceShards, check_heads

        check_heads(heads, self.size)
        return None if self.size == 1 else SequenceShards(self, tokens_per_frame, heads)

    def column_shards(self, latent_width: int):
        """The VAE decoder's share (:class:`~worldplay.ranks.columns.ColumnShards`), or None."""
        from .columns import ColumnShards

        return None if self.size == 1 else ColumnShards(self, latent_width)

    # -- tensors --------------------------------------------------------------------------

    def all_to_all(self, send: torch.Tensor, send_sizes: list[int], recv_sizes: list[int], purpose: str) -> torch.Tensor:
        """Flat ``send``: ``send_sizes[j]`` elements for rank j, in rank order -> flat receive
        buffer with ``recv_sizes[i]`` elements from rank i, in rank order."""
        if self.size == 1:
            return send
        self.traffic[purpose] += (sum(send_sizes) - send_sizes[self.rank]) * send.element_size()
        return self._all_to_all(send, send_sizes, recv_sizes)

    def _all_to_all(self, send: torch.Tensor, send_sizes: list[int], recv_sizes: list[int]) -> torch.Tensor:
        out = send.new_empty(sum(recv_sizes))
        dist.all_to_all_single(out, send, recv_sizes, send_sizes, group=self.process_group)
        return out

    def _all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t, group=self.process_group)
        return parts

    def gather_along(self, t: torch.Tensor, dim: int, sizes: tuple[int, ...], purpose: str) -> torch.Tensor:
        """Every rank's piece of ``t`` along ``dim`` (rank r's has ``sizes[r]`` entries there),
        put together in rank order, on every rank. Pieces of unequal size are padded to the
        largest for the collective and cut back after it."""
        if self.size == 1:
            return t
        dim %= t.ndim
        biggest = max(sizes)
        if t.shape[dim] != sizes[self.rank]:
            raise ValueError(f"rank {self.rank}'s piece has {t.shape[dim]} entries along dim {dim}, "
                             f"not {sizes[self.rank]}")
        if biggest > t.shape[dim]:
            pad = list(t.shape)
            pad[dim] = biggest - t.shape[dim]
            t = torch.cat([t, t.new_zeros(pad)], dim)
        t = t.contiguous()
        self.traffic[purpose] += (self.size - 1) * t.numel() * t.element_size()
        parts = self._all_gather(t)
        return torch.cat([p.narrow(dim, 0, s) for p, s in zip(parts, sizes, strict=True)], dim)

    def exchange_edges(self, to_left: torch.Tensor, to_right: torch.Tensor,
                       purpose: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Send ``to_left`` to rank - 1 and ``to_right`` to rank + 1 (both of one shape, the
        same on every rank); returns what rank - 1 sent right and rank + 1 sent left (None
        past the first and the last rank). One all-to-all with empty parts for the others."""
        if self.size == 1:
            return None, None
        count, r = to_left.numel(), self.rank
        sizes = [0] * self.size
        parts = []
        if r > 0:
            sizes[r - 1] = count
            parts.append(to_left.reshape(-1))
        if r < self.size - 1:
            sizes[r + 1] = count
            parts.append(to_right.reshape(-1))
        got = self.all_to_all(torch.cat(parts), sizes, sizes, purpose)
        offsets = starts(tuple(sizes))
        left = got[offsets[r - 1]: offsets[r]].view(to_left.shape) if r > 0 else None
        right = got[offsets[r + 1]: offsets[r + 2]].view(to_right.shape) if r < self.size - 1 else None
        return left, right

    # -- Python objects (start-up checks, results) -----------------------------------------

    def all_gather_object(self, obj) -> list:
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj, group=self.process_group)
        return out

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.size == 1:
            return obj
        box = [obj if self.leader else None]
        dist.broadcast_object_list(box, src=0, group=self.process_group)
        return box[0]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self.process_group)


class HostStagedRankGroup(RankGroup):
    """A :class:`RankGroup` whose tensor collectives run through gloo on host copies, so that
    several ranks may share one GPU (NCCL refuses two ranks on one device: "Duplicate GPU
    detected"). The arithmetic is the direct transport's; each exchange adds a device-to-host
    copy, a gloo (TCP) transfer and a host-to-device copy, and a synchronisation that no CUDA
    graph can capture. The collectives stay out of ``torch.compile``'s graphs (a graph break
    each), as NCCL's would not."""

    @torch.compiler.disable
    def _all_to_all(self, send: torch.Tensor, send_sizes: list[int], recv_sizes: list[int]) -> torch.Tensor:
        host = send.cpu()
        out = host.new_empty(sum(recv_sizes))
        dist.all_to_all_single(out, host, recv_sizes, send_sizes, group=self.process_group)
        return out.to(send.device)

    @torch.compiler.disable
    def _all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        host = t.cpu()
        parts = [torch.empty_like(host) for _ in range(self.size)]
        dist.all_gather(parts, host, group=self.process_group)
        return [p.to(t.device) for p in parts]


# How the ranks' tensors travel, and the group class that carries them: "direct" (NCCL between
# GPUs, gloo on the CPU) or "host" (gloo over host copies of device tensors: several ranks on one
# GPU, which NCCL refuses; a check of the sharded arithmetic at full size, not a speed figure, and
# no CUDA graphs).
TRANSPORTS: dict[str, type[RankGroup]] = {"direct": RankGroup, "host": HostStagedRankGroup}


def unknown_transport(transport) -> str | None:
    """The one-line error for a transport that is not one of ``TRANSPORTS``, else None."""
    return None if transport in TRANSPORTS else f"transport {transport!r} unknown; choose one of {list(TRANSPORTS)}"
