"""The DiT in host memory: what runs on the device is copied there, part of it block by block.

``RolloutSettings.dit_on_host`` keeps the loaded DiT (bf16) in host memory; :class:`PlacedDiT`
makes the model a runner calls (:class:`worldplay.accel.DiTRunner`): a structural copy of the
DiT (or of its fp8 variant, :class:`worldplay.nn.fp8.Fp8Linears`) whose small non-block modules
and *resident* blocks are copied to the device once, and whose ``streamed_blocks`` other blocks
stay in pinned host memory and are copied into one of two device slots just before they run
(:class:`StreamedBlocks`). The DiT that was given is never changed.

Streaming. Each streamed block's parameters and buffers are packed into one pinned host buffer,
so that bringing a block to the device is one large copy (~346 MB in bf16, ~170 MB with fp8
linears at wan5b). While block ``j`` runs from one slot, the next streamed block is copied
into the other on a side stream; the copy into a slot waits (an event on the compute stream)
until the block that used it before has run, and a block waits for its own copy before it
runs. Streamed blocks are spread evenly over the depth, so a copy overlaps the resident
blocks in between. On the CPU there are no streams: the copies happen in line (the same
structure, so tests exercise it).

Cost, predicted (notes/perf.md): a forward needs every streamed block's bytes over PCIe once;
at ~50 GB/s (pinned, PCIe 5) 30 bf16 blocks take ~0.2 s per forward, 5 forwards per chunk. The
results equal the resident DiT's bit for bit: the same kernels read the same values.
CUDA graphs are not supported with streamed blocks (the copies and events would have to be
captured too); compiled blocks are.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

SLOTS = 2  # device slots for streamed blocks: one running, one being filled
_ALIGN = 256  # bytes: every tensor packed into a block buffer starts on this boundary


def streamed_indices(num_blocks: int, streamed: int) -> list[int]:
    """Which of ``num_blocks`` blocks are streamed: ``streamed`` of them (all of them when it is
    more; a profile names one count for every preset), spread evenly over the depth (the last
    block is always one), so that each copy overlaps resident blocks."""
    if streamed < 0:
        raise ValueError(f"streamed_blocks must be >= 0, got {streamed}")
    streamed = min(streamed, num_blocks)
    if streamed == 0:
        return []
    return sorted({num_blocks - 1 - (i * num_blocks) // streamed for i in range(streamed)})


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every distinct parameter and buffer of ``module`` with its dotted name."""
    seen: set[int] = set()
    out = []
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            out.append((name, t))
    return out


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _set_tensor(module: nn.Module, dotted: str, value: torch.Tensor) -> None:
    owner_path, _, leaf = dotted.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


def device_copy(module: nn.Module, device: torch.device) -> nn.Module:
    """A copy of ``module`` whose tensors are on ``device``; tensors already there are shared,
    not copied (so on the device the DiT was loaded on, nothing is duplicated)."""
    memo = {}
    for _, t in _tensors(module):
        moved = t if t.device == device else t.detach().to(device)
        memo[id(t)] = nn.Parameter(moved, requires_grad=False) if isinstance(t, nn.Parameter) else moved
    return copy.deepcopy(module, memo)


@dataclass(frozen=True)
class _Packed:
    """Where each tensor of a block lives in its flat buffer."""

    names: tuple[str, ...]
    offsets: tuple[int, ...]
    shapes: tuple[torch.Size, ...]
    dtypes: tuple[torch.dtype, ...]
    nbytes: int

    @classmethod
    def of(cls, tensors: list[tuple[str, torch.Tensor]]) -> _Packed:
        offsets, cursor = [], 0
        for _, t in tensors:
            offsets.append(cursor)
            cursor += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
        return cls(tuple(n for n, _ in tensors), tuple(offsets), tuple(t.shape for _, t in tensors),
                   tuple(t.dtype for _, t in tensors), cursor)

    def pack(self, tensors: list[tuple[str, torch.Tensor]], buffer: torch.Tensor) -> None:
        for view, (_, t) in zip(self.views(buffer), tensors, strict=True):
            view.copy_(t.detach())

    def views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for offset, shape, dtype in zip(self.offsets, self.shapes, self.dtypes, strict=True):
            size = shape.numel() * dtype.itemsize
            out.append(buffer[offset : offset + size].view(dtype).view(shape))
        return out


class _Streams:
    """The side stream and events of the copies on CUDA; in line (no-ops) elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.copy = torch.cuda.Stream(device) if self.cuda else None
        self.device = device

    def event(self):
        return torch.cuda.Event() if self.cuda else None

    def copy_after_compute(self, dst: torch.Tensor, src: torch.Tensor, done) -> None:
        """``dst.copy_(src)`` once the work queued so far on the compute stream has run; ``done``
        is recorded when the copy has landed."""
        if not self.cuda:
            dst.copy_(src)
            return
        self.copy.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy):
            dst.copy_(src, non_blocking=True)
            done.record(self.copy)

    def compute_waits(self, done) -> None:
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(done)


class _Slot:
    def __init__(self, template: nn.Module, layout: _Packed, device: torch.device, streams: _Streams):
        self.buffer = torch.empty(layout.nbytes, dtype=torch.uint8, device=device)
        # The template's tensors are views into the slot buffer: filling the buffer loads a block.
        self.module = device_copy_structure(template)
        for name, view in zip(layout.names, layout.views(self.buffer), strict=True):
            _set_tensor(self.module, name, view)
        self.block: int | None = None  # the block whose weights are (being) copied in
        self.ready = streams.event()


def device_copy_structure(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s structure whose tensors are empty meta placeholders (to be set)."""
    memo = {}
    for _, t in _tensors(module):
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(empty, requires_grad=False) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(module, memo)


class StreamedBlocks(nn.Module):
    """Stands for a DiT's ``blocks``: iterating yields, for each layer in order, the module to
    run, with its weights on the device (resident, or just copied into a slot), and starts the
    copy of the next streamed block."""

    def __init__(self, blocks: nn.ModuleList, streamed: list[int], device: torch.device):
        super().__init__()
        self.count = len(blocks)
        self.streamed = list(streamed)
        self.device = device
        self.streams = _Streams(device)
        self.resident = nn.ModuleDict({str(i): device_copy(b, device) for i, b in enumerate(blocks)
                                       if i not in set(streamed)})
        self.host: dict[int, torch.Tensor] = {}
        self.slots: list[_Slot] = []
        if streamed:
            layouts = {i: _Packed.of(_tensors(blocks[i])) for i in streamed}
            if len({layout.names for layout in layouts.values()}) != 1:
                raise ValueError("streamed blocks must share one structure")
            pin = torch.cuda.is_available() and device.type == "cuda"
            for i in streamed:
                host = torch.empty(layouts[i].nbytes, dtype=torch.uint8, pin_memory=pin)
                layouts[i].pack(_tensors(blocks[i]), host)
                self.host[i] = host
            self.layout = layouts[streamed[0]]
            self.slots = [_Slot(blocks[streamed[0]], self.layout, device, self.streams) for _ in range(SLOTS)]
        self._running: _Slot | None = None

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        for i in range(self.count):
            yield self[i]

    def __getitem__(self, index: int) -> nn.Module:
        if str(index) in self.resident:
            self._prefetch_after(index)
            return self.resident[str(index)]
        slot = self._slot_holding(index) or self._fill(index)
        self.streams.compute_waits(slot.ready)
        self._running = slot
        self._prefetch_after(index)
        return slot.module

    def _slot_holding(self, index: int) -> _Slot | None:
        return next((s for s in self.slots if s.block == index), None)

    def _fill(self, index: int) -> _Slot:
        """Copy block ``index`` into the slot that is not running (it waits for that slot's
        previous block to have run)."""
        slot = next(s for s in self.slots if s is not self._running)
        slot.block = index
        self.streams.copy_after_compute(slot.buffer, self.host[index], slot.ready)
        return slot

    def _prefetch_after(self, index: int) -> None:
        """Start copying the next streamed block after ``index`` (cyclically: the last block's
        successor is the next forward's first) unless it is already in a slot."""
        if not self.streamed:
            return
        following = next((j for j in self.streamed if j > index), self.streamed[0])
        if self._slot_holding(following) is None:
            self._fill(following)

    @property
    def device_nbytes(self) -> int:
        resident = _nbytes(t for b in self.resident.values() for _, t in _tensors(b) if t.device == self.device)
        return resident + sum(s.buffer.numel() for s in self.slots)

    @property
    def host_nbytes(self) -> int:
        return sum(h.numel() for h in self.host.values())


class PlacedDiT:
    """What a runner calls when the DiT's weights live in host memory: ``model`` is a structural
    copy of ``dit`` (a :class:`~worldplay.nn.dit.WanDiT`, or the fp8 variant) with its non-block
    tensors on ``device``, its blocks resident there except ``streamed`` of them, which are
    streamed (:class:`StreamedBlocks`)."""

    def __init__(self, dit: nn.Module, device: torch.device | str, streamed: int = 0):
        device = torch.device(device)
        self.source = dit
        self.device = device
        indices = streamed_indices(len(dit.blocks), streamed)
        blocks = StreamedBlocks(dit.blocks, indices, device)
        shell = copy.copy(dit)
        shell._modules = dict(dit._modules)
        shell._parameters = dict(dit._parameters)
        shell._buffers = dict(dit._buffers)
        shell._modules.pop("blocks")
        shell = device_copy(shell, device)  # non-block modules and tensors on the device
        shell._modules["blocks"] = blocks
        self.model = shell
        self.blocks = blocks

    @property
    def device_nbytes(self) -> int:
        """The bytes of the device tensors this model runs with (the non-block modules, the resident
        blocks and the two slots; tensors shared with a DiT already on the device included)."""
        others = _nbytes(t for name, t in _tensors(self.model) if not name.startswith("blocks.")
                         and t.device == self.device)
        return others + self.blocks.device_nbytes

    @property
    def host_nbytes(self) -> int:
        """Pinned host bytes of the streamed blocks (the given DiT's own memory not counted)."""
        return self.blocks.host_nbytes


def place_models(models, settings, device: torch.device | str) -> None:
    """Put a run's DiT where ``settings`` wants its weights: in host memory for
    ``dit_on_host`` (the runner copies what it needs to the device), else on ``device``. For
    the drivers (CLI, legs) right after loading; frees the cached device memory it leaves."""
    device = torch.device(device)
    target = torch.device("cpu") if settings.dit_on_host else device
    if next(models.dit.parameters()).device != target:
        models.dit.to(target)
        if device.type == "cuda":
            torch.cuda.empty_cache()
