"""Reconstituted-context memory: fixed-size buffers written in place, and the position rule.

Each chunk after the first attends to up to 16 earlier latent frames (the 12 most recent plus
one retrieved 4-frame clip, see :mod:`worldplay.memory_select`). Before the chunk's first
denoising step their keys/values are recomputed ("prefill") from the clean latents at the
context timestep (``reprefill``, the official behaviour).

Storage: one K and one V buffer per layer, ``[branches*B, (16 + 4) * S, H, d]``, allocated once
per rollout. Memory frames occupy the *last* N of the 16 memory slots (right-aligned), the
chunk the 4 slots after them; attention reads the contiguous token range of the valid slots
(a view: nothing is allocated or concatenated). From chunk 4 on N = 16 and every shape and
address is constant, so the steady state can be captured in a CUDA graph.

Positions (the official reframing, one rule for queries and keys): the N selected frames,
in ascending frame order, get temporal RoPE positions 0..N-1 and the chunk gets N..N+3. RoPE
depends only on differences, so the recent context keeps its true distance to the chunk at
every chunk, and the retrieved clip is placed just before the recent context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .nn.dit import KVBuffers

MEMORY_SLOTS = 16
CHUNK_LATENTS = 4
RECENT_CONTEXT = 12
# Memory frames (and the image latent of chunk 0) are presented as "almost clean":
# stabilization_level - 1 = 14 in the official pipeline.
CONTEXT_TIMESTEP = 14.0


def memory_positions(num_memory: int, chunk: int = CHUNK_LATENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Temporal RoPE positions of the N memory frames and of the chunk (official reframing)."""
    mem = torch.arange(num_memory, dtype=torch.float64)
    return mem, torch.arange(num_memory, num_memory + chunk, dtype=torch.float64)


class MemoryKV(KVBuffers):
    """Per-layer keys/values of the memory slots plus the chunk slots, preallocated."""

    def __init__(
        self,
        num_layers: int,
        batch: int,
        branches: int,
        tokens_per_frame: int,
        heads: int,
        head_dim: int,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        memory_slots: int = MEMORY_SLOTS,
        chunk_slots: int = CHUNK_LATENTS,
    ):
        self.tokens_per_frame = tokens_per_frame
        self.memory_slots = memory_slots
        self.chunk_slots = chunk_slots
        total = (memory_slots + chunk_slots) * tokens_per_frame
        shape = (num_layers, branches * batch, total, heads, head_dim)
        try:
            self.k = torch.zeros(shape, device=device, dtype=dtype)
            self.v = torch.zeros(shape, device=device, dtype=dtype)
        except torch.OutOfMemoryError as exc:
            gib = 2 * torch.Size(shape).numel() * torch.finfo(dtype).bits / 8 / 2**30
            raise torch.OutOfMemoryError(
                f"the memory K/V buffers need {gib:.1f} GiB ({shape} x2, {dtype}) and do not fit on "
                f"{device}; free GPU memory or use a smaller resolution"
            ) from exc

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[index], self.v[index]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def memory_tokens(self, num_memory: int) -> slice:
        """Token range of the N right-aligned memory slots (written by the prefill)."""
        self._check(num_memory)
        s = self.tokens_per_frame
        return slice((self.memory_slots - num_memory) * s, self.memory_slots * s)

    def chunk_tokens(self) -> slice:
        s = self.tokens_per_frame
        return slice(self.memory_slots * s, (self.memory_slots + self.chunk_slots) * s)

    def attended_tokens(self, num_memory: int) -> slice:
        """What the chunk attends to: the N valid memory slots and itself."""
        self._check(num_memory)
        s = self.tokens_per_frame
        return slice((self.memory_slots - num_memory) * s, (self.memory_slots + self.chunk_slots) * s)

    def _check(self, num_memory: int) -> None:
        if not 0 <= num_memory <= self.memory_slots:
            raise ValueError(f"{num_memory} memory frames do not fit the {self.memory_slots} slots")


@dataclass
class LatentHistory:
    """Clean latents and per-latent conditioning of the whole rollout, preallocated.

    ``latents [B, C, T, h, w]`` (model dtype), ``viewmats [T, 4, 4]``, ``intrinsics [T, 3, 3]``
    (float32, as the official pipeline buffers) and ``actions [T]`` for every latent of the
    trajectory; chunks write their clean result in place.
    """

    latents: torch.Tensor
    viewmats: torch.Tensor
    intrinsics: torch.Tensor
    actions: torch.Tensor
    # Gather target for the memory frames: the last N of its 16 slots are used.
    memory_latents: torch.Tensor

    @classmethod
    def allocate(
        cls,
        batch: int,
        channels: int,
        num_latents: int,
        height: int,
        width: int,
        viewmats: torch.Tensor,
        intrinsics: torch.Tensor,
        actions: torch.Tensor,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> LatentHistory:
        return cls(
            latents=torch.zeros(batch, channels, num_latents, height, width, device=device, dtype=dtype),
            viewmats=viewmats.to(device=device, dtype=torch.float32),
            intrinsics=intrinsics.to(device=device, dtype=torch.float32),
            actions=actions.to(device=device, dtype=torch.float32),
            memory_latents=torch.zeros(batch, channels, MEMORY_SLOTS, height, width, device=device, dtype=dtype),
        )

    def gather_memory(self, indices: torch.Tensor) -> torch.Tensor:
        """Copy the selected clean latents into the right-aligned memory slots (in place) and
        return the view of the valid slots."""
        n = indices.numel()
        target = self.memory_latents[:, :, MEMORY_SLOTS - n :]
        target.copy_(self.latents.index_select(2, indices))
        return target


class ReuseState:
    """Bookkeeping of the ``reuse`` memory mode: which physical memory slot holds each latent
    frame and at which temporal RoPE position its keys are currently rotated.

    Frames stay in their slots for as long as they are selected: attention does not care about
    slot order (keys are permutation-invariant once rotated at the right position), so only the
    RoPE-branch keys of kept frames are re-rotated in place when their rank changes, and a newly
    selected frame takes the slot of a frame that left the selection.
    """

    def __init__(self) -> None:
        self.slot: dict[int, int] = {}  # frame -> physical memory slot
        self.positions: dict[int, int] = {}  # frame -> temporal position its keys carry

    def reset(self, selected: list[int], memory_slots: int) -> None:
        """After a full prefill of ``selected`` into the right-aligned block (rank order)."""
        base = memory_slots - len(selected)
        self.slot = {f: base + i for i, f in enumerate(selected)}
        self.positions = {f: i for i, f in enumerate(selected)}

    def plan(self, selected: list[int], memory_slots: int) -> tuple[dict[int, int], list[tuple[int, int]]]:
        """For a new selection: ``kept`` (frame -> slot, for frames already held in the new
        valid block) and ``missing`` [(frame, slot)] (frames to compute, each given a free slot
        of the block; both in ascending order)."""
        block = range(memory_slots - len(selected), memory_slots)
        kept = {f: self.slot[f] for f in selected if f in self.slot and self.slot[f] in block}
        used = set(kept.values())
        free = [s for s in block if s not in used]
        new = [f for f in selected if f not in kept]
        return kept, list(zip(new, free, strict=True))

    def commit(self, selected: list[int], kept: dict[int, int], missing: list[tuple[int, int]]) -> None:
        self.slot = {**kept, **dict(missing)}
        self.positions = {f: i for i, f in enumerate(selected)}
