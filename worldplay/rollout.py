"""The chunked autoregressive rollout, as a generator: a loop over a :class:`~worldplay.session.WorldSession`.

Per chunk it yields the decoded uint8 frames, the chunk's clean latents, the memory frames it
attended to, and its stage timings (:class:`ChunkOutput`). The CLI, benchmarks, drift studies
and parity checks all consume this one stream; the live server steps the same session with a
player's keys instead of a scripted trajectory. The order of work per chunk and the RNG order are
described in :mod:`worldplay.session`.

This module holds the vocabulary of generation (settings, output records, the stage timer) and
:class:`WorldPlayPipeline`, which holds the models and what is worth keeping across rollouts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .accel import ACCEL_MODES
from .actions import chunk_poses
from .constants import CHUNK_LATENTS, OFFICIAL_NOISE_LATENTS
from .decode_runner import DECODE_GROUPS, DecodeOptions, DecodeRunner
from .memory_select import MemorySelection
from .nn.attention import check_backend
from .nn.dit import WanDiT
from .nn.fp8 import Fp8Linears
from .offload import PlacedDiT
from .pose import Trajectory

# reprefill: the official behaviour (all memory K/V recomputed every chunk). reuse: a fast
# approximation that keeps the K/V of frames that stay selected (re-rotated to their new
# positions) and computes only newly selected frames; its drift is measured, never assumed.
MEMORY_MODES = ("reprefill", "reuse")
LINEAR_DTYPES = ("bf16", "fp8")
KV_DTYPES = ("bf16", "fp8")


class RolloutError(ValueError):
    """The rollout cannot start with these inputs; the message says what to change."""


@dataclass(frozen=True)
class RolloutSettings:
    # Chunks of a rollout; for a live session, the chunks its history is preallocated for (it
    # may run longer, see worldplay.session).
    num_chunk: int
    seed: int = 0
    noise_latents: int = OFFICIAL_NOISE_LATENTS
    attention_backend: str = "sdpa"
    memory_mode: str = "reprefill"
    image_latent: str = "sample"  # official: a posterior sample; "mode" uses the mean
    # The official model stores its RoPE tables in bf16 (the whole model is cast with
    # .to(bfloat16)); True reproduces that, False keeps float32 tables.
    official_rope_tables: bool = True
    accel: str = "eager"  # see worldplay.accel: eager, compile, graphs, compile+graphs
    fast_decode: bool = False  # channels-last + compiled VAE decoder (worldplay.decode_runner)
    # "fp8": the DiT blocks' linear layers in e4m3 with per-row scales (worldplay.nn.fp8), a fast
    # approximation whose drift is measured; "bf16": the model dtype (exact).
    linear_dtype: str = "bf16"
    # worldplay.nn.fused: q/k norm + RoPE + PRoPE + K/V store in one Triton pass and the FFN's
    # GELU in its GEMM epilogue (CUDA; exact up to the order of float32 sums). Elsewhere the
    # same PyTorch code runs.
    fused_kernels: bool = False
    # False: no VAE decode here (frames come back empty); the clean latents are handed on in
    # ChunkOutput.device_latents, e.g. to a decoder on another GPU (worldplay.pipelined).
    decode: bool = True
    # -- memory (worldplay.memory_plan counts what each costs; worldplay.lowvram combines them) --
    # Latents per decoder call (1, 2 or 4): the decoder's activations scale with it; the frames
    # are the same (exact).
    decode_group: int = 4
    # >0: the decoder's full-resolution stages on this many frames at a time (exact, less memory).
    decode_top_frames: int = 0
    # fast_decode's channels-last copy of the decoder weights (1.03 GiB at wan5b); False runs the
    # VAE's own weights with channels-last activations (exact; cuDNN re-lays weights per call).
    decoder_copy: bool = True
    # "fp8": the memory K/V in e4m3 with a scale per token and head (worldplay.memory.Fp8MemoryKV),
    # a fast approximation whose drift is measured; "bf16": the model dtype (exact).
    kv_dtype: str = "bf16"
    # The DiT's weights stay in host memory; the runner copies to the device what it runs
    # (worldplay.offload.PlacedDiT), streaming `streamed_blocks` of its blocks (all, if more) from
    # pinned host memory per forward (exact; no CUDA graphs then). Drivers load the DiT on the host.
    dit_on_host: bool = False
    streamed_blocks: int = 0
    # Free the memory K/V between a chunk's last step and the next prefill, so the decoder's
    # activations use that memory (exact in reprefill mode). On CUDA the K/V lives in its own
    # allocator pool and the decode allocates from it, so the K/V comes back at its address and
    # CUDA graphs stay valid (worldplay.memory.MemoryKV.lent).
    release_kv_for_decode: bool = False

    def __post_init__(self) -> None:
        if self.num_chunk < 1:
            raise RolloutError(f"num_chunk must be >= 1, got {self.num_chunk}")
        if self.noise_latents < self.num_chunk * CHUNK_LATENTS:
            raise RolloutError(
                f"noise_latents={self.noise_latents} is smaller than the {self.num_chunk * CHUNK_LATENTS} "
                f"latents of {self.num_chunk} chunks"
            )
        if self.memory_mode not in MEMORY_MODES:
            raise RolloutError(f"memory_mode {self.memory_mode!r} unknown; choose one of {MEMORY_MODES}")
        if self.image_latent not in ("sample", "mode"):
            raise RolloutError("image_latent must be 'sample' or 'mode'")
        check_backend(self.attention_backend)
        if self.accel not in ACCEL_MODES:
            raise RolloutError(f"accel {self.accel!r} unknown; choose one of {ACCEL_MODES}")
        if self.linear_dtype not in LINEAR_DTYPES:
            raise RolloutError(f"linear_dtype {self.linear_dtype!r} unknown; choose one of {LINEAR_DTYPES}")
        check_memory_settings(self)


def fastest_settings(device_type: str) -> dict[str, Any]:
    """The fastest known native ``RolloutSettings`` overrides: the one place the
    fastest settings are defined (``worldplay run --fastest`` and the ``native-fastest`` leg read them) (the performance work updates it here).

    On CUDA: FlashAttention-4 (the optional ``flash-attn-4`` package, 8-12 % faster than cuDNN on
    the H100 for these shapes) where it imports, else cuDNN attention; compiled blocks, the
    steady-state prefill and steps as CUDA-graph replays, the fused q/k/v and GELU kernels
    (``worldplay.nn.fused``), and the channels-last compiled VAE decoder (notes/perf.md has the
    measurements). The result records the backend used.
    On the CPU cuDNN attention and CUDA graphs do not exist; the dispatcher's choice (``sdpa``)
    stands in, eagerly, and the result says so.
    """
    if device_type == "cuda":
        from .nn.attention import fa4_usable

        backend = "fa4" if fa4_usable() else "cudnn"
        return {"attention_backend": backend, "accel": "compile+graphs", "fast_decode": True, "fused_kernels": True}
    return {"attention_backend": "sdpa"}


def check_memory_settings(settings: RolloutSettings) -> None:
    """The memory settings and the combinations they exclude (each with the fix)."""
    if settings.decode_group not in DECODE_GROUPS:
        raise RolloutError(f"decode_group {settings.decode_group} unknown; choose one of {DECODE_GROUPS} latents per call")
    if isinstance(settings.decode_top_frames, bool) or not isinstance(settings.decode_top_frames, int) \
            or settings.decode_top_frames < 0:
        raise RolloutError(f"decode_top_frames must be an integer >= 0 (0: off), got {settings.decode_top_frames!r}")
    if settings.kv_dtype not in KV_DTYPES:
        raise RolloutError(f"kv_dtype {settings.kv_dtype!r} unknown; choose one of {KV_DTYPES}")
    if settings.kv_dtype == "fp8" and settings.memory_mode != "reprefill":
        raise RolloutError("kv_dtype='fp8' needs memory_mode='reprefill' (reuse re-rotates stored keys in place)")
    if isinstance(settings.streamed_blocks, bool) or not isinstance(settings.streamed_blocks, int) \
            or settings.streamed_blocks < 0:
        raise RolloutError(f"streamed_blocks must be an integer >= 0, got {settings.streamed_blocks!r}")
    graphs = "graphs" in settings.accel
    if settings.streamed_blocks and not settings.dit_on_host:
        raise RolloutError("streamed_blocks streams the DiT from host memory: set dit_on_host=True as well")
    if settings.streamed_blocks and graphs:
        raise RolloutError(f"streamed_blocks needs accel 'eager' or 'compile' (CUDA graphs cannot capture the "
                           f"block copies), got {settings.accel!r}")
    if settings.release_kv_for_decode and settings.memory_mode != "reprefill":
        raise RolloutError("release_kv_for_decode needs memory_mode='reprefill' (reuse keeps the K/V across chunks)")


@dataclass
class ChunkOutput:
    """One chunk of a rollout, from one device (:meth:`WorldPlayPipeline.rollout`) or two
    (:class:`worldplay.pipelined.TwoDevicePipeline`)."""

    index: int
    frames: torch.Tensor  # uint8 [T, H, W, 3] on the CPU (13 frames for chunk 0, then 16)
    latents: torch.Tensor  # clean normalised latents [1, C, 4, h, w] (float32, CPU)
    memory: MemorySelection | None
    timings_ms: dict[str, float] = field(default_factory=dict)
    device_latents: torch.Tensor | None = None  # the clean latents in the model dtype, on the device
    # time.perf_counter() stamps of the chunk's milestones: "ready" (its frames are on the host);
    # two devices add "sent" (rank 0 handed its latents to the transfer).
    clock_s: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """No TF32 in matmuls or cuDNN convolutions inside the ``with`` (float32 references)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class WorldPlayPipeline:
    """Holds the models; starts sessions (one world, stepped chunk by chunk) and rollouts (one
    video along a scripted trajectory: a loop over a session).

    :meth:`session` makes a :class:`~worldplay.session.WorldSession`; :meth:`rollout` steps one
    along a trajectory.

    The models stay as they were loaded: every speed-up lives in a runner that the settings
    choose (:class:`worldplay.accel.DiTRunner`, :class:`worldplay.decode_runner.DecodeRunner`),
    so rollouts with different settings can run in any order. What is worth keeping across
    rollouts (fp8 weights, a re-laid-out compiled decoder) is cached here, per setting."""

    def __init__(self, dit: WanDiT, vae, *, device: torch.device | str, dtype: torch.dtype = torch.bfloat16,
                 ranks=None):
        if not dit.worldplay:
            raise RolloutError("the DiT has no HY-WorldPlay modules (build it with worldplay=True)")
        self.dit = dit
        self.vae = vae
        self.device = torch.device(device)
        self.dtype = dtype
        # worldplay.ranks.RankGroup: this process's rank of a session run over several (None: one rank)
        self.ranks = ranks
        self._fp8: Fp8Linears | None = None
        self._decode_runners: dict[DecodeOptions, DecodeRunner] = {}
        self._placed: dict[tuple[str, int], PlacedDiT] = {}

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def decode_runner(self, options: DecodeOptions) -> DecodeRunner:
        """The VAE decode with ``options`` (made once per options and kept)."""
        if options not in self._decode_runners:
            self._decode_runners[options] = DecodeRunner(self.vae, options)
        return self._decode_runners[options]

    def fp8_linears(self) -> Fp8Linears:
        """The DiT's block linears in fp8 (made once and kept)."""
        if self._fp8 is None:
            self._fp8 = Fp8Linears(self.dit, quantize_on=self.device)
        return self._fp8

    def placed_dit(self, settings: RolloutSettings) -> PlacedDiT | None:
        """``settings.dit_on_host``: the device side of the DiT (or of its fp8 variant) that runs
        from host memory, made once per (linear dtype, streamed blocks) and kept."""
        if not settings.dit_on_host:
            return None
        key = (settings.linear_dtype, settings.streamed_blocks)
        if key not in self._placed:
            source = self.fp8_linears().model() if settings.linear_dtype == "fp8" else self.dit
            self._placed[key] = PlacedDiT(source, self.device, settings.streamed_blocks)
        return self._placed[key]

    def session(self, image: torch.Tensor, text_states: torch.Tensor, settings: RolloutSettings, *,
                decode_options: DecodeOptions | None = None, preallocate: int | None = None,
                third_person: bool = False):
        """A :class:`~worldplay.session.WorldSession` from ``image [3, H, W]`` in [-1, 1] and the
        prompt embeddings ``text_states [1, L, text_dim]``: one :meth:`~worldplay.session.WorldSession.step`
        per chunk; ``preallocate``: chunks its history is allocated for (default ``settings.num_chunk``);
        ``third_person``: live controls labelled as the official ``tps=True`` mode."""
        from .session import WorldSession  # the session builds on this module's vocabulary

        return WorldSession(self, image, text_states, settings, decode_options=decode_options,
                            preallocate=preallocate, third_person=third_person)

    def rollout(
        self,
        image: torch.Tensor,
        text_states: torch.Tensor,
        trajectory: Trajectory,
        settings: RolloutSettings,
        *,
        decode_options: DecodeOptions | None = None,
    ) -> Iterator[ChunkOutput]:
        """Generate ``settings.num_chunk`` chunks from ``image [3, H, W]`` in [-1, 1] and the
        prompt embeddings ``text_states [1, L, text_dim]`` along ``trajectory``: a session
        stepped with the trajectory's chunks.

        ``decode_options``: decoder options other than those ``settings.fast_decode`` chooses
        (probes of decode variants, e.g. CUDA graphs)."""
        traj = trajectory.for_chunks(settings.num_chunk)  # errors before any model work
        session = self.session(image, text_states, settings, decode_options=decode_options)
        for chunk in range(settings.num_chunk):
            yield session.step(chunk_poses(traj, chunk))
        session.finish()
