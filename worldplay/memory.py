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

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .constants import CHUNK_LATENTS, MEMORY_SLOTS
from .nn.dit import KVBuffers
from .nn.fp8 import E4M3, E4M3_MAX

# Memory frames (and the image latent of chunk 0) are presented as "almost clean":
# stabilization_level - 1 = 14 in the official pipeline.
CONTEXT_TIMESTEP = 14.0


def memory_positions(num_memory: int, chunk: int = CHUNK_LATENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Temporal RoPE positions of the N memory frames and of the chunk (official reframing)."""
    mem = torch.arange(num_memory, dtype=torch.float64)
    return mem, torch.arange(num_memory, num_memory + chunk, dtype=torch.float64)


_ALIGN = 256  # bytes: each tensor of a store starts on a boundary every kernel accepts


def _allocate(what: str, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], device,
              fill: bool = True) -> dict[str, torch.Tensor]:
    """Tensors of the given shapes, views of one allocation (zero-filled when ``fill``); an OOM
    names what did not fit and its size.

    One allocation, so that a store freed and allocated again in its own pool (see
    :meth:`MemoryKV.lent`) comes back at the same address: the pool then holds one free block."""
    offsets, end = {}, 0
    for name, (shape, dtype) in shapes.items():
        offsets[name] = end
        end += -(-torch.Size(shape).numel() * dtype.itemsize // _ALIGN) * _ALIGN
    try:
        flat = torch.empty(end, device=device, dtype=torch.uint8)
    except torch.OutOfMemoryError as exc:
        raise torch.OutOfMemoryError(
            f"{what} need {end / 2**30:.1f} GiB and do not fit on {device}; free GPU memory, use a smaller "
            "resolution or a --low-vram profile"
        ) from exc
    if fill:
        flat.zero_()
    out = {}
    for name, (shape, dtype) in shapes.items():
        size = torch.Size(shape).numel() * dtype.itemsize
        out[name] = flat[offsets[name] : offsets[name] + size].view(dtype).view(shape)
    return out


@contextlib.contextmanager
def _routed_to(pool):
    """CUDA allocations inside the ``with`` come from ``pool`` (None: the default pool)."""
    if pool is None:
        yield
        return
    with torch.cuda.use_mem_pool(pool):
        yield


class MemoryKV(KVBuffers):
    """Per-layer keys/values of the memory slots plus the chunk slots, preallocated.

    :meth:`lent` frees the buffers for the decode and lends it their memory
    (``RolloutSettings.release_kv_for_decode``: in ``reprefill`` mode they are dead between a
    chunk's last denoising step and the next prefill, which rewrites every slot it reads); the
    next ``layer()`` call allocates them again. With ``lend_pool`` on CUDA the store lives in
    its own allocator pool (``torch.cuda.MemPool``) and the lent code allocates from that pool,
    so the store comes back at the address it had once the lent tensors are freed: CUDA graphs
    that captured the address stay valid. The allocator never hands out memory that a live
    tensor holds, so nothing can overwrite anything; if the address ever changes (a tensor of
    the lent code still alive), :attr:`addresses` shows it and :class:`worldplay.accel.DiTRunner`
    captures its graphs again."""

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
        lend_pool: bool = False,
    ):
        self.tokens_per_frame = tokens_per_frame
        self.memory_slots = memory_slots
        self.chunk_slots = chunk_slots
        self.device = torch.device(device)
        self.dtype = dtype
        self.num_layers, self.rows, self.heads, self.head_dim = num_layers, branches * batch, heads, head_dim
        self._tensors: dict[str, torch.Tensor] | None = None
        self._pool = torch.cuda.MemPool() if lend_pool and self.device.type == "cuda" else None
        self.acquisitions = 0  # allocations of the buffers (1 + one per lent decode)
        self.moves = 0  # times addresses found the buffers elsewhere than at its last call
        self._last_addresses: tuple[int, ...] | None = None
        self._acquire()

    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every tensor this store holds (what the memory plan counts)."""
        total = (self.memory_slots + self.chunk_slots) * self.tokens_per_frame
        shape = (self.num_layers, self.rows, total, self.heads, self.head_dim)
        return {"k": (shape, self.dtype), "v": (shape, self.dtype)}

    def _acquire(self) -> None:
        if self._tensors is None:
            # Zero-filled once; after a release the contents are dead (the next prefill writes
            # every slot it reads), so a re-allocation is not filled.
            with _routed_to(self._pool):
                self._tensors = _allocate("the memory K/V buffers", self.shapes(), self.device,
                                          fill=self.acquisitions == 0)
            self.acquisitions += 1

    def release(self) -> None:
        """Free the buffers until the next ``layer()`` call (their contents are lost)."""
        self._tensors = None

    @contextlib.contextmanager
    def lent(self):
        """Free the buffers for the ``with`` body and route its CUDA allocations into their pool
        (with ``lend_pool``), so it reuses their memory. Tensors the body makes live in the
        store's memory: copy out what must outlive the next prefill (the frames go to the host)."""
        self.release()
        with _routed_to(self._pool):
            yield

    @property
    def addresses(self) -> tuple[int, ...]:
        """The data addresses of the buffers, which a CUDA graph captures (allocated first if
        released); ``moves`` counts the calls that found them elsewhere than the call before."""
        self._acquire()
        addresses = tuple(t.data_ptr() for t in self._tensors.values())
        if self._last_addresses is not None and addresses != self._last_addresses:
            self.moves += 1
        self._last_addresses = addresses
        return addresses

    @property
    def k(self) -> torch.Tensor:
        self._acquire()
        return self._tensors["k"]

    @property
    def v(self) -> torch.Tensor:
        self._acquire()
        return self._tensors["v"]

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[index], self.v[index]

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers when allocated (counted from their shapes)."""
        return sum(torch.Size(shape).numel() * dtype.itemsize for shape, dtype in self.shapes().values())

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


# Tokens quantised per pass: bounds the float32 temporaries of a prefill's store (14,080 tokens at
# 704x1280 would need ~0.7 GB per layer at once); per-token work, so the result does not depend on it.
_QUANTIZE_TOKENS = 4096


def quantize_heads(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., d]`` -> (e4m3 values, float32 scales ``[..., 1]``): absmax scaling of each
    token's head vector to the e4m3 range (the scheme of ``worldplay.nn.fp8``, per head)."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (x.float() / scale).to(E4M3), scale


class QuantizedLayerKV(NamedTuple):
    """One layer of :class:`Fp8MemoryKV`: the e4m3 keys/values of the memory slots ``[rows,
    memory tokens, H, d]`` with their float32 scales ``[rows, memory tokens, H, 1]``, and the
    bf16 work buffers ``[rows, memory + chunk tokens, H, d]`` (shared by all layers) that
    attention reads. A tuple of tensors, so that it passes through compiled code like the plain
    ``(k, v)`` pair."""

    k8: torch.Tensor
    v8: torch.Tensor
    k_scale: torch.Tensor
    v_scale: torch.Tensor
    k_work: torch.Tensor
    v_work: torch.Tensor

    @property
    def work(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_work, self.v_work

    def _triples(self):
        return ((self.k8, self.k_scale, self.k_work), (self.v8, self.v_scale, self.v_work))

    def load(self, read: slice, write: slice | torch.Tensor) -> None:
        """Dequantise into the work buffers the memory tokens of ``read`` that this call does not
        write itself (in place: e4m3 -> bf16 is exact, then the float32 scale multiplies)."""
        start, stop = read.start, min(read.stop, self.k8.shape[1])
        if start >= stop or (isinstance(write, slice) and write.start <= start and write.stop >= stop):
            return
        for x8, scale, work in self._triples():
            target = work[:, start:stop]
            target.copy_(x8[:, start:stop])
            target.mul_(scale[:, start:stop])

    def save(self, write: slice | torch.Tensor) -> None:
        """Quantise the memory tokens this call has written to the work buffers into the store
        (a chunk's own tokens, past the memory slots, are never stored)."""
        if isinstance(write, torch.Tensor):  # token indices (a partial prefill), all in the memory slots
            for x8, scale, work in self._triples():
                q8, s = quantize_heads(work.index_select(1, write))
                x8.index_copy_(1, write, q8)
                scale.index_copy_(1, write, s)
            return
        end = min(write.stop, self.k8.shape[1])
        for start in range(write.start, end, _QUANTIZE_TOKENS):
            stop = min(start + _QUANTIZE_TOKENS, end)
            for x8, scale, work in self._triples():
                q8, s = quantize_heads(work[:, start:stop])
                x8[:, start:stop].copy_(q8)
                scale[:, start:stop].copy_(s)


class Fp8MemoryKV(MemoryKV):
    """``RolloutSettings.kv_dtype="fp8"``: the memory slots' keys/values in e4m3 with a float32
    scale per token and head (half the bytes of bf16 plus 1/32 for the scales), a fast
    approximation whose drift is measured.

    Only the memory slots are stored per layer. A chunk's own keys/values are needed only by
    its own layer's attention, so they go straight into one bf16 work buffer shared by every
    layer, next to that layer's memory keys/values dequantised for the read; the chunk
    attends to its own keys/values exactly, and a prefill to the exact keys/values it has
    just computed (only what later calls read from the store is rounded to e4m3). See
    ``worldplay.nn.dit._store_and_attend``."""

    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        memory = self.memory_slots * self.tokens_per_frame
        total = (self.memory_slots + self.chunk_slots) * self.tokens_per_frame
        store = (self.num_layers, self.rows, memory, self.heads, self.head_dim)
        scales = (self.num_layers, self.rows, memory, self.heads, 1)
        work = (self.rows, total, self.heads, self.head_dim)
        return {"k8": (store, E4M3), "v8": (store, E4M3), "k_scale": (scales, torch.float32),
                "v_scale": (scales, torch.float32), "k_work": (work, self.dtype), "v_work": (work, self.dtype)}

    @property
    def k(self) -> torch.Tensor:
        raise AttributeError("Fp8MemoryKV has no bf16 key buffer; use layer(i)")

    @property
    def v(self) -> torch.Tensor:
        raise AttributeError("Fp8MemoryKV has no bf16 value buffer; use layer(i)")

    def layer(self, index: int) -> QuantizedLayerKV:
        self._acquire()
        t = self._tensors
        return QuantizedLayerKV(t["k8"][index], t["v8"][index], t["k_scale"][index], t["v_scale"][index],
                                t["k_work"], t["v_work"])


def new_memory_kv(kv_dtype: str, *args, **kwargs) -> MemoryKV:
    """The memory K/V store of ``RolloutSettings.kv_dtype`` ("bf16": the model dtype, exact)."""
    return Fp8MemoryKV(*args, **kwargs) if kv_dtype == "fp8" else MemoryKV(*args, **kwargs)


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
