"""Running the DiT calls of a rollout: eagerly, with compiled blocks, and/or as CUDA-graph replays.

The steady state (16 memory frames, from chunk 4 on) has constant shapes and addresses: the
memory K/V buffers are written in place, the RoPE tables are constant, and every per-chunk
input is copied into a static buffer before replay. So one graph for the prefill and one for a
denoising step serve every steady chunk. Chunks 0-3 (memory sizes 0/4/8/12) run eagerly; they
are the warm-up.

Modes (``RolloutSettings.accel``):

* ``eager``: plain PyTorch;
* ``compile``: every block through one function compiled with ``torch.compile`` (the 30 blocks share one
  compiled graph per shape; only the steady-state shapes are compiled, so no recompiles);
* ``graphs``: steady-state calls captured in CUDA graphs (no compile);
* ``compile+graphs``: both (the fastest).

With ``fp8`` (``RolloutSettings.linear_dtype="fp8"``) the runner calls the DiT variant of
:class:`worldplay.nn.fp8.Fp8Linears` (its own fp8 copies of the block linears); with ``placed``
(``RolloutSettings.dit_on_host``) it calls the device-side copy of a DiT kept in host memory,
part of whose blocks may be streamed (``worldplay.offload.PlacedDiT``; no CUDA graphs
then). The DiT it was given is never changed.

With ``shards`` (a DiT over several ranks, :mod:`worldplay.ranks.sequence`) every call runs on
this rank's tokens and exchanges with the other ranks inside the attention step; the ranks make
the same calls in the same order, and a CUDA graph captures the exchanges with the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .graphs import CapturedCall
from .memory import CHUNK_LATENTS, MEMORY_SLOTS, MemoryKV
from .nn.dit import TextContext, WanDiT
from .nn.fp8 import Fp8Linears
from .nn.parallel import TokenShards
from .offload import PlacedDiT

ACCEL_MODES = ("eager", "compile", "graphs", "compile+graphs")


def _call_block(block, x, e, text_kv, inputs, kv):
    return block(x, e, text_kv, inputs, kv)


@dataclass
class AccelStats:
    """Counters published with bench results (a graph that is re-captured or a function that
    recompiles in the steady state would show here)."""

    captures: int = 0
    replays: int = 0
    eager_calls: int = 0
    compiled_calls: int = 0
    recompiles: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("captures", "replays", "eager_calls", "compiled_calls", "recompiles")}


class DiTRunner:
    """The two DiT calls of a chunk (memory prefill, denoising step) in the chosen mode, with
    the block linears in fp8 when ``fp8`` (made from ``dit``) is given."""

    def __init__(self, dit: WanDiT, mode: str, backend: str, fused: bool = False, *,
                 fp8: Fp8Linears | None = None, placed: PlacedDiT | None = None, shards: TokenShards | None = None):
        if mode not in ACCEL_MODES:
            raise ValueError(f"accel mode {mode!r} unknown; choose one of {ACCEL_MODES}")
        if fp8 is not None and fp8.dit is not dit:
            raise ValueError("the fp8 linears were made from another DiT")
        self.dit = dit
        self.model = dit if fp8 is None else fp8.model()  # what the calls run
        if placed is not None:
            if placed.source is not self.model:
                raise ValueError("the placed DiT was made from another model")
            if "graphs" in mode and placed.blocks.streamed:
                raise ValueError("CUDA graphs do not capture streamed blocks; use accel 'eager' or 'compile'")
            self.model = placed.model
        self.mode = mode
        self.backend = backend
        self.fused = fused  # worldplay.nn.fused kernels
        self.shards = shards  # this rank's tokens over several ranks (None: one rank)
        self.stats = AccelStats()
        self._compiled = torch.compile(_call_block, dynamic=False) if "compile" in mode else None
        self._graphs: dict[str, tuple[tuple[int, ...], CapturedCall]] = {}  # name -> (K/V addresses, graph)
        self._pool = None
        self._dynamo_start = _dynamo_compiles()

    def _use_graphs(self, device: torch.device, n_mem: int) -> bool:
        return "graphs" in self.mode and device.type == "cuda" and n_mem == MEMORY_SLOTS

    def _block_fn(self, n_mem: int):
        # Compile only the steady-state shapes: warm-up chunks would each add a recompile.
        if self._compiled is not None and n_mem == MEMORY_SLOTS:
            self.stats.compiled_calls += 1
            return self._compiled
        self.stats.eager_calls += 1
        return None

    def text_context(self, text_states: torch.Tensor) -> TextContext:
        """The prompt's cross-attention keys/values, from the model the calls run (its weights on
        the device)."""
        return self.model.text_context(text_states)

    def prefill(self, latents, timesteps, text: TextContext, kv: MemoryKV, n_mem: int, rope, **cams) -> None:
        def run(i):
            self.model(i["latents"], i["timesteps"], text, rope=rope, kv_buffers=kv,
                       write=kv.memory_tokens(n_mem), read=kv.memory_tokens(n_mem), prefill=True,
                       attention_backend=self.backend, fused_kernels=self.fused, block_fn=self._block_fn(n_mem),
                       shards=self.shards, **{k: i[k] for k in cams})

        self._call("prefill", self._use_graphs(latents.device, n_mem), run,
                   {"latents": latents, "timesteps": timesteps, **cams}, kv)

    def step(self, x, timesteps, text: TextContext, kv: MemoryKV, n_mem: int, rope, **cams) -> torch.Tensor:
        def run(i):
            return self.model(i["latents"], i["timesteps"], text, rope=rope, kv_buffers=kv,
                              write=kv.chunk_tokens(), read=kv.attended_tokens(n_mem),
                              attention_backend=self.backend, fused_kernels=self.fused,
                              block_fn=self._block_fn(n_mem), shards=self.shards, **{k: i[k] for k in cams})

        return self._call("step", self._use_graphs(x.device, n_mem), run, {"latents": x, "timesteps": timesteps, **cams},
                          kv)

    def partial_prefill(self, latents, timesteps, text: TextContext, kv: MemoryKV, n_mem: int,
                        write: torch.Tensor, rope, **cams) -> None:
        """``reuse`` memory mode: K/V of newly selected memory frames only, written at the token
        indices ``write`` and attending to the whole selection. The common steady case (16
        memory frames, the previous chunk's 4 new) has constant shapes, so it is compiled and
        captured like a full prefill; the write indices and the RoPE tables (the new frames'
        ranks) are static inputs of that graph."""
        common = n_mem == MEMORY_SLOTS and latents.shape[2] == CHUNK_LATENTS

        def run(i):
            self.model(i["latents"], i["timesteps"], text, rope=(i["cos"], i["sin"]), kv_buffers=kv,
                       write=i["write"], read=kv.memory_tokens(n_mem), prefill=True,
                       attention_backend=self.backend, fused_kernels=self.fused,
                       block_fn=self._block_fn(n_mem) if common else self._eager(), shards=self.shards,
                       **{k: i[k] for k in cams})

        self._call("partial", common and self._use_graphs(latents.device, n_mem), run,
                   {"latents": latents, "timesteps": timesteps, "cos": rope[0], "sin": rope[1], "write": write, **cams},
                   kv)

    def _call(self, name: str, graphed: bool, run, inputs: dict[str, torch.Tensor], kv: MemoryKV):
        """``run(inputs)`` eagerly, or as the replay of the graph ``name``, captured at its first
        call with static copies of ``inputs`` (later inputs are copied into them before replay).
        A graph also captured the K/V's addresses: if the store came back elsewhere after lending
        its memory to the decode (``MemoryKV.lent``), the graph is captured again (counted)."""
        if not graphed:
            return run(inputs)
        entry = self._graphs.get(name)
        where = kv.addresses
        if entry is not None and entry[0] != where:
            self.stats.notes.append(f"{name}: the memory K/V moved; graph captured again")
            entry = None
        if entry is None:
            statics = {k: v.clone() for k, v in inputs.items()}
            entry = (where, self._capture(name, lambda: run(statics), statics))
            self._graphs[name] = entry
        out = entry[1](**inputs)
        self.stats.replays += 1
        return out

    def _eager(self):
        self.stats.eager_calls += 1
        return None

    def _capture(self, name: str, fn, statics) -> CapturedCall:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = CapturedCall(fn, statics, self._pool)
        self.stats.captures += 1
        return graph

    def steady_state_begins(self) -> None:
        """Called once the first steady chunk (and its compiles/captures) is done: any graph
        dynamo compiles after this point is a recompile in the steady state."""
        self._dynamo_start = _dynamo_compiles()
        self._steady = True

    def finish(self) -> AccelStats:
        if getattr(self, "_steady", False):
            self.stats.recompiles = _dynamo_compiles() - self._dynamo_start
        return self.stats


def _dynamo_compiles() -> int:
    """Frames dynamo has compiled so far in this process."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # pragma: no cover - counters are best effort
        return 0
