"""Counting the GPU memory of a rollout: every resident thing and the big transients, in bytes.

One table per (preset, resolution, :class:`~worldplay.rollout.RolloutSettings`), used by the
notes (notes/perf.md), the out-of-memory message of the CLI, the low-VRAM profiles
(:mod:`worldplay.lowvram`), the bench (each leg records its plan next to its measured peaks)
and the site's "which card runs which mode" table.

* **Residents** (held for the whole rollout: weights, the memory K/V, the decoder's history,
  the noise, ...) are counted by building the very objects the rollout builds on the ``meta``
  device (shapes and dtypes, no storage), so they equal the real objects' bytes exactly
  (``tests/test_memory_plan.py`` holds them to it on the tiny preset).
* **Transients** (one DiT forward's activations, one decoder call's) are *traced*: the eager
  code runs on fake tensors (``torch._subclasses.FakeTensorMode``: shapes, no data, no compute)
  at the real size, while a dispatch mode adds up the bytes of the tensors alive at each moment
  (:class:`LiveBytes`). That is the eager code's peak, an estimate of the GPU's: compiled code
  fuses elementwise work (fewer, not more, temporaries in practice), fused kernels write in
  place, and the CUDA caching allocator rounds blocks up and keeps freed ones cached (reserved
  >= allocated). ``scripts/memory_probe.py`` measures each stage on the GPU.

The peak is modelled as residents + the larger of the DiT stage's and the decode stage's
transients (+ a workspace allowance for cuBLAS/cuDNN/compile buffers nobody counts); the
reserved upper bound adds both stages' transients (an allocator that reuses nothing across
the two stages' shapes). CUDA graphs keep the captured DiT calls' transients in a private pool
for the rest of the rollout, so with graphs the DiT stage's transient is a resident.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

GIB = 2**30
# cuBLAS/cuDNN workspaces, compile buffers, allocator rounding: not counted item by item. An
# allowance, to be replaced by the gap measured between this plan and the GPU (memory_probe).
WORKSPACE_ALLOWANCE = 1 * GIB


@dataclass(frozen=True)
class MemoryItem:
    """One line of the plan. ``stage``: "" for a resident (the whole rollout), else the stage
    ("dit", "decode") during which the transient lives. ``exact``: counted from shapes (True)
    or traced/estimated (False)."""

    name: str
    nbytes: int
    stage: str = ""
    exact: bool = True
    note: str = ""

    @property
    def gib(self) -> float:
        return self.nbytes / GIB


@dataclass(frozen=True)
class MemoryPlan:
    preset: str
    height: int
    width: int
    items: tuple[MemoryItem, ...]
    # Residents freed during the decode (release_kv_for_decode): their bytes do not add to the
    # decode stage.
    released_for_decode: int = 0

    @property
    def resident_bytes(self) -> int:
        return sum(i.nbytes for i in self.items if not i.stage)

    def stage_bytes(self, stage: str) -> int:
        return max([i.nbytes for i in self.items if i.stage == stage], default=0)

    @property
    def stage_peaks(self) -> dict[str, int]:
        """Bytes held during each stage: residents + that stage's largest transient."""
        r = self.resident_bytes
        return {"dit": r + self.stage_bytes("dit"),
                "decode": r - self.released_for_decode + self.stage_bytes("decode")}

    @property
    def peak_bytes(self) -> int:
        """Predicted peak allocated: the larger stage + the workspace allowance."""
        return max(self.stage_peaks.values()) + WORKSPACE_ALLOWANCE

    @property
    def reserved_upper_bytes(self) -> int:
        """Predicted reserved, worst case: both stages' transients cached at once."""
        return self.resident_bytes + self.stage_bytes("dit") + self.stage_bytes("decode") + WORKSPACE_ALLOWANCE

    def rows(self) -> list[dict[str, Any]]:
        """The table: one row per item, then the totals (GiB, 3 decimals)."""
        out = [{"item": i.name, "gib": round(i.gib, 3), "when": i.stage or "resident",
                "counted": "exact" if i.exact else "estimate", "note": i.note} for i in self.items]
        peaks = self.stage_peaks
        out += [
            {"item": "residents", "gib": round(self.resident_bytes / GIB, 3), "when": "total", "counted": "exact"
             if all(i.exact for i in self.items if not i.stage) else "estimate", "note": ""},
            {"item": "DiT stage (residents + its transient)", "gib": round(peaks["dit"] / GIB, 3), "when": "total",
             "counted": "estimate", "note": ""},
            {"item": "decode stage (residents + its transient)", "gib": round(peaks["decode"] / GIB, 3),
             "when": "total", "counted": "estimate",
             "note": "the memory K/V is released for the decode" if self.released_for_decode else ""},
            {"item": "workspace allowance", "gib": round(WORKSPACE_ALLOWANCE / GIB, 3), "when": "total",
             "counted": "estimate", "note": "cuBLAS/cuDNN/compile buffers, allocator rounding"},
            {"item": "predicted peak allocated", "gib": round(self.peak_bytes / GIB, 3), "when": "total",
             "counted": "estimate", "note": ""},
            {"item": "predicted reserved, upper bound", "gib": round(self.reserved_upper_bytes / GIB, 3),
             "when": "total", "counted": "estimate", "note": "no reuse of cached blocks between the stages"},
        ]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "resolution": [self.height, self.width],
                "peak_allocated_gib": round(self.peak_bytes / GIB, 3),
                "reserved_upper_gib": round(self.reserved_upper_bytes / GIB, 3),
                "resident_gib": round(self.resident_bytes / GIB, 3),
                "stage_gib": {k: round(v / GIB, 3) for k, v in self.stage_peaks.items()},
                "items": [{"name": i.name, "gib": round(i.gib, 4), "bytes": i.nbytes, "stage": i.stage,
                           "exact": i.exact, "note": i.note} for i in self.items]}

    def markdown(self) -> str:
        """The table as Markdown (for the notes)."""
        lines = ["| item | GiB | when | counted | note |", "|---|---|---|---|---|"]
        for r in self.rows():
            lines.append(f"| {r['item']} | {r['gib']:.3f} | {r['when']} | {r['counted']} | {r['note']} |")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Tracing transients on fake tensors
# ---------------------------------------------------------------------------------------------


class LiveBytes(TorchDispatchMode):
    """Adds up the bytes of the tensors created inside it that are still alive; ``peak`` is the
    highest total. A tensor counts once per storage (views and in-place results are free), from
    the op that created it until its storage is freed. Works on real and fake tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.peak_op = ""
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def _freed(self, nbytes: int, _ref) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = [t.untyped_storage() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if storage in self._seen or any(storage is s for s in inputs):
                continue
            nbytes = storage.nbytes()
            self._seen[storage] = weakref.ref(storage, functools.partial(self._freed, nbytes))
            self.live += nbytes
            if self.live > self.peak:
                self.peak, self.peak_op = self.live, f"{func} -> {tuple(t.shape)} {t.dtype}"
        return out


def _trace(fn) -> tuple[int, str]:
    """Peak bytes alive (and the op that reached it) while ``fn()`` runs under the current fake mode."""
    tracker = LiveBytes()
    with torch.no_grad(), tracker:
        out = fn()
    del out
    return tracker.peak, tracker.peak_op


@functools.lru_cache(maxsize=4)
def _fake_models(preset: str, dtype: torch.dtype):
    """(fake mode, a two-layer DiT, the VAE) in fake tensors. Two layers trace the same per-block
    peak as thirty: every block is alike, and a prefill's last block only stores its K/V."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .config import dit_preset, vae_preset
    from .nn.dit import WanDiT
    from .nn.vae import WanVAE

    mode = FakeTensorMode()
    saved = torch.get_default_dtype()
    with mode:
        torch.set_default_dtype(dtype)
        try:
            dit = WanDiT(dataclasses.replace(dit_preset(preset), num_layers=2), worldplay=True).eval()
            vae = WanVAE(vae_preset(preset)).eval()
        finally:
            torch.set_default_dtype(saved)
    return mode, dit, vae


def _shares(ranks: int, tokens: int, heads: int, latent_w: int):
    """Rank 0's shares of a session over ``ranks`` (the largest pieces of uneven splits), with
    collectives that move nothing (worldplay.ranks.traffic): (token shards, column shards)."""
    if ranks == 1:
        return None, None
    from .ranks.traffic import CountingGroup

    group = CountingGroup(0, ranks)
    return group.token_shards(tokens, heads), group.column_shards(latent_w)


@functools.lru_cache(maxsize=32)
def _traced_transients(preset: str, height: int, width: int, dtype: torch.dtype, linear_dtype: str,
                       kv_dtype: str, decode_group: int, top_frames: int, memory_mode: str,
                       text_tokens: int, ranks: int = 1) -> dict[str, tuple]:
    """Traced eager transients: {"prefill", "step", "decode", "reuse_rotation"} -> (bytes, peak op);
    over ``ranks``, rank 0's (its tokens, its heads' keys/values, its columns, the exchange buffers)."""
    from .memory import CHUNK_LATENTS, CONTEXT_TIMESTEP, MEMORY_SLOTS, memory_positions, new_memory_kv
    from .nn.fp8 import Fp8Linears

    mode, dit, vae = _fake_models(preset, dtype)
    dcfg = dit.config
    spatial = vae.config.scale_factor_spatial
    lh, lw = height // spatial, width // spatial
    tokens = (lh // 2) * (lw // 2)
    out: dict[str, tuple] = {}
    shards, columns = _shares(ranks, tokens, dcfg.num_attention_heads, lw)
    with mode, torch.no_grad():
        model = Fp8Linears(dit).model() if linear_dtype == "fp8" else dit
        kv = new_memory_kv(kv_dtype, dcfg.num_layers, 1, 2, tokens, dcfg.num_attention_heads // ranks,
                           dcfg.attention_head_dim, device="cpu", dtype=dtype)
        text = model.text_context(torch.zeros(1, text_tokens, dcfg.text_dim, dtype=dtype))

        def forward(frames: int, prefill: bool):
            mem_pos, chunk_pos = memory_positions(MEMORY_SLOTS)
            rope = dit.rope_for(mem_pos if prefill else chunk_pos, frames, lh, lw, "cpu", dtype)
            cams = {"actions": torch.zeros(1, frames), "viewmats": torch.eye(4).expand(1, frames, 4, 4).contiguous(),
                    "intrinsics": torch.eye(3).expand(1, frames, 3, 3).contiguous()}
            latents = torch.zeros(1, dcfg.in_channels, frames, lh, lw, dtype=dtype)
            timesteps = torch.full((1, frames), CONTEXT_TIMESTEP)
            write = kv.memory_tokens(MEMORY_SLOTS) if prefill else kv.chunk_tokens()
            read = kv.memory_tokens(MEMORY_SLOTS) if prefill else kv.attended_tokens(MEMORY_SLOTS)
            return _trace(lambda: model(latents, timesteps, text, rope=rope, kv_buffers=kv, write=write, read=read,
                                        prefill=prefill, shards=shards, **cams))

        out["prefill"] = forward(MEMORY_SLOTS, True)
        out["step"] = forward(CHUNK_LATENTS, False)
        state = vae.new_decode_state(1, lh, lw, dtype=dtype, columns=columns)
        state.fresh = False  # a steady call (the first call decodes fewer frames)
        z = torch.zeros(1, vae.config.z_dim, decode_group, lh, lw, dtype=dtype)
        out["decode"] = _trace(lambda: vae.decode(z, state, top_frames=top_frames or None))
        if memory_mode == "reuse":
            from .nn.rope import rotate_temporal

            # worldplay.rollout re-rotates kept keys 6 layers at a time.
            keys = torch.zeros(6, 1, MEMORY_SLOTS, tokens, dcfg.num_attention_heads // ranks, dcfg.attention_head_dim,
                               dtype=dtype)
            cos = torch.zeros(MEMORY_SLOTS, 1, dcfg.attention_head_dim // 2)
            out["reuse_rotation"] = _trace(lambda: rotate_temporal(keys, cos, cos))
    return out


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _module_nbytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@functools.lru_cache(maxsize=8)
def _meta_models(preset: str, dtype: torch.dtype):
    from .config import dit_preset, vae_preset
    from .nn.dit import WanDiT
    from .nn.vae import WanVAE

    with torch.device("meta"):
        dit = WanDiT(dit_preset(preset), worldplay=True).to(dtype)
        vae = WanVAE(vae_preset(preset)).to(dtype)
    return dit, vae


def _dit_items(dit, settings) -> list[MemoryItem]:
    """The DiT's bytes on the device for ``settings``: all of it where it was loaded on the device
    (+ the fp8 copies), else what the placement copies there (worldplay.offload)."""
    from .nn.fp8 import Fp8Linears
    from .offload import SLOTS, _Packed, _tensors, streamed_indices

    items = []
    runs = Fp8Linears(dit).model() if settings.linear_dtype == "fp8" else dit
    if not settings.dit_on_host:
        items.append(MemoryItem("DiT weights (bf16)", _module_nbytes(dit)))
        if settings.linear_dtype == "fp8":
            shared = {id(t) for t in [*dit.parameters(), *dit.buffers()]}
            fp8_only = sum(t.numel() * t.element_size() for _, t in _tensors(runs) if id(t) not in shared)
            items.append(MemoryItem("fp8 copies of the block linears", fp8_only,
                                    note="next to the bf16 weights (linear_dtype='fp8')"))
        return items
    kind = "fp8 linears" if settings.linear_dtype == "fp8" else "bf16"
    streamed = streamed_indices(len(runs.blocks), settings.streamed_blocks)
    non_block = sum(t.numel() * t.element_size() for name, t in _tensors(runs) if not name.startswith("blocks."))
    resident = sum(_nbytes(t for _, t in _tensors(b)) for i, b in enumerate(runs.blocks) if i not in streamed)
    items.append(MemoryItem("DiT non-block modules (device copy)", non_block, note="the weights stay in host memory"))
    items.append(MemoryItem(f"DiT resident blocks ({len(runs.blocks) - len(streamed)}, {kind})", resident))
    if streamed:
        slot = _Packed.of(_tensors(runs.blocks[streamed[0]])).nbytes
        items.append(MemoryItem(f"DiT streaming slots ({SLOTS} x one {kind} block)", SLOTS * slot,
                                note=f"{len(streamed)} blocks streamed from pinned host memory per forward"))
    return items


def plan_memory(preset: str, height: int, width: int, settings, *, dtype: torch.dtype = torch.bfloat16,
                device_type: str = "cuda", text_tokens: int | None = None, trace: bool = True,
                ranks: int = 1) -> MemoryPlan:
    """The memory plan of one rollout of ``preset`` at ``height x width`` with ``settings``
    (a :class:`~worldplay.rollout.RolloutSettings`) in model dtype ``dtype``. ``device_type``
    "cuda" counts CUDA graphs' private pool when the settings capture graphs. ``text_tokens``:
    the prompt embedding's length (default: the umT5 length the CLI uses, 512; 16 for tiny).
    ``trace=False`` leaves the transients out (residents only, instant). ``ranks``: the plan of
    one GPU of a session over that many (worldplay.ranks: weights, text K/V and RoPE tables on
    every rank; the memory K/V by heads, the decoder's history and activations by columns, the
    DiT's activations by tokens, plus the exchange buffers; rank 0, the largest share)."""
    from .config import dit_preset
    from .decode_runner import DecodeOptions
    from .memory import CHUNK_LATENTS, MEMORY_SLOTS, LatentHistory, new_memory_kv

    dit, vae = _meta_models(preset, dtype)
    cfg = dit_preset(preset)
    spatial = vae.config.scale_factor_spatial
    lh, lw = height // spatial, width // spatial
    tokens = (lh // 2) * (lw // 2)
    text_tokens = text_tokens or (512 if preset == "wan5b" else 16)
    items = _dit_items(dit, settings)
    items.append(MemoryItem("VAE weights (encoder + decoder)", _module_nbytes(vae)))
    options = DecodeOptions.for_settings(settings)
    if settings.decode and options.channels_last and options.copy_weights:
        items.append(MemoryItem("decoder channels-last copy", _module_nbytes(vae.decoder),
                                note="fast_decode with decoder_copy"))
    kv = new_memory_kv(settings.kv_dtype, cfg.num_layers, 1, 2, tokens, cfg.num_attention_heads // ranks,
                       cfg.attention_head_dim, device="meta", dtype=dtype)
    kv_note = ("e4m3 memory slots + float32 scales + one bf16 work buffer" if settings.kv_dtype == "fp8"
               else f"{MEMORY_SLOTS} memory + {CHUNK_LATENTS} chunk slots x {tokens} tokens, 2 branches, K and V")
    if ranks > 1:
        kv_note += f"; {cfg.num_attention_heads // ranks} of {cfg.num_attention_heads} heads on each of {ranks} ranks"
    items.append(MemoryItem(f"memory K/V ({settings.kv_dtype})", kv.nbytes, note=kv_note))
    if settings.decode:
        state = vae.new_decode_state(1, lh, lw, device="meta", dtype=dtype, columns=_shares(ranks, tokens,
                                     cfg.num_attention_heads, lw)[1])
        items.append(MemoryItem("decode state (decoder history)", state.nbytes,
                                note=f"{len(state.buffers)} causal-conv history buffers"))
    items.append(MemoryItem("noise (float32)", 4 * cfg.in_channels * settings.noise_latents * lh * lw,
                            note=f"{settings.noise_latents} latents drawn at once, as the official RNG order"))
    num_latents = settings.num_chunk * CHUNK_LATENTS
    history = LatentHistory.allocate(1, cfg.in_channels, num_latents, lh, lw, torch.zeros(num_latents, 4, 4),
                                     torch.zeros(num_latents, 3, 3), torch.zeros(num_latents), device="meta",
                                     dtype=dtype)
    items.append(MemoryItem("latent history + memory gather",
                            _nbytes(getattr(history, f.name) for f in dataclasses.fields(history))))
    items.append(MemoryItem("text cross-attention K/V",
                            2 * cfg.num_layers * cfg.num_attention_heads * text_tokens * cfg.attention_head_dim
                            * dtype.itemsize, note=f"{text_tokens} prompt tokens"))
    rope = 0
    for n_mem in sorted({min(MEMORY_SLOTS, 4 * c) for c in range(settings.num_chunk)}):
        frames = n_mem + CHUNK_LATENTS  # the memory table (none for 0) and the chunk table
        rope += 2 * frames * tokens * (cfg.attention_head_dim // 2) * 4
    items.append(MemoryItem("RoPE tables (float32)", rope, note="one memory + one chunk table per memory size"))
    released = kv.nbytes if settings.release_kv_for_decode else 0
    if trace:
        t = _traced_transients(preset, height, width, dtype, settings.linear_dtype, settings.kv_dtype,
                               settings.decode_group, settings.decode_top_frames, settings.memory_mode, text_tokens,
                               ranks)
        graphs = device_type == "cuda" and "graphs" in settings.accel
        prefill, step = t["prefill"], t["step"]
        if graphs:
            items.append(MemoryItem("CUDA graph pool (prefill + step captures)", max(prefill[0], step[0]), exact=False,
                                    note="their transients, held from the first steady chunk on"))
        else:
            items.append(MemoryItem("DiT prefill of 16 memory latents (eager trace)", prefill[0], stage="dit",
                                    exact=False, note=f"peak at {prefill[1]}"))
            items.append(MemoryItem("DiT denoising step (eager trace)", step[0], stage="dit", exact=False,
                                    note=f"peak at {step[1]}"))
        if "reuse_rotation" in t:
            items.append(MemoryItem("reuse: re-rotation of kept keys (eager trace)", t["reuse_rotation"][0],
                                    stage="dit", exact=False, note="6 layers at a time"))
        if settings.decode:
            decode = t["decode"]
            sliced = f", {settings.decode_top_frames} frame(s) at a time on top" if settings.decode_top_frames else ""
            items.append(MemoryItem(f"decoder call of {settings.decode_group} latent(s){sliced} (eager trace)", decode[0],
                                    stage="decode", exact=False, note=f"peak at {decode[1]}"))
    return MemoryPlan(preset, height, width, tuple(items), released_for_decode=released)


def describe_need(plan: MemoryPlan) -> str:
    """``about 48.6 GiB (weights 9.9, memory K/V 12.1, ...)``: the largest items, for messages."""
    big = sorted((i for i in plan.items if not i.stage), key=lambda i: -i.nbytes)[:3]
    parts = ", ".join(f"{i.name} {i.gib:.1f}" for i in big)
    return f"about {plan.peak_bytes / GIB:.1f} GiB ({parts} GiB, plus transients)"
