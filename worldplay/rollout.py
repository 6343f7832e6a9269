"""The chunked autoregressive rollout, as a generator.

Per chunk it yields the decoded uint8 frames, the chunk's clean latents, the memory frames it
attended to, and its stage timings. The CLI, benchmarks, drift studies and parity checks all
consume this one stream.

Order of work per chunk (official semantics, ``reprefill`` memory mode):

1. memory selection (chunks >= 1): 12 recent + 1 retrieved clip from chunk 4 on, all earlier
   latents before; the selected clean latents are gathered into the right-aligned slots;
2. prefill: one pass of the DiT over the memory latents at t = 14 writes every layer's K/V in
   place;
3. four Euler steps over the chunk's 4 latents attending to [memory; chunk];
4. the clean chunk is stored in the latent history and decoded by the streaming VAE.

RNG (so that a seeded rollout can match the official one): after seeding, the memory point
cloud comes from the CPU generator; one float32 noise tensor ``[1, 48, noise_latents, h, w]``
is drawn on the device (chunk c uses latents 4c..4c+3 of it, so every chunk's noise depends on
``noise_latents``, 241 in the official CLI), then the image latent's posterior sample.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .accel import ACCEL_MODES, DiTRunner
from .media import frames_to_uint8
from .memory import (
    CHUNK_LATENTS,
    CONTEXT_TIMESTEP,
    MEMORY_SLOTS,
    LatentHistory,
    MemoryKV,
    ReuseState,
    memory_positions,
)
from .memory_select import MemorySelection, memory_point_cloud, select_memory
from .nn.attention import check_backend, fa4_usable
from .nn.dit import WanDiT
from .nn.fp8 import fp8_linears
from .nn.rope import rotate_temporal, temporal_rotation_tables
from .pose import Trajectory
from .sampler import distilled_schedule, euler_step

# reprefill: the official behaviour (all memory K/V recomputed every chunk). reuse: a fast
# approximation that keeps the K/V of frames that stay selected (re-rotated to their new
# positions) and computes only newly selected frames; its drift is measured, never assumed.
MEMORY_MODES = ("reprefill", "reuse")
LINEAR_DTYPES = ("bf16", "fp8")
OFFICIAL_NOISE_LATENTS = 241  # (961 - 1) // 4 + 1: the official CLI's default --num_frames 961


class RolloutError(ValueError):
    """The rollout cannot start with these inputs; the message says what to change."""


@dataclass(frozen=True)
class RolloutSettings:
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
    fast_decode: bool = False  # channels-last + compiled VAE decoder (WanVAE.enable_fast_decode)
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


@dataclass
class ChunkOutput:
    index: int
    frames: torch.Tensor  # uint8 [T, H, W, 3] on the CPU (13 frames for chunk 0, then 16)
    latents: torch.Tensor  # clean normalised latents [1, C, 4, h, w] (float32, CPU)
    memory: MemorySelection | None
    timings_ms: dict[str, float] = field(default_factory=dict)
    device_latents: torch.Tensor | None = None  # the clean latents in the model dtype, on the device


class StageTimer:
    """Stage boundaries as CUDA events (GPU) or perf_counter (CPU), read once per chunk.

    ``mark(name)`` closes the stage ``name`` that started at the previous mark; nothing
    synchronises until :meth:`read`, which the rollout calls after the chunk's frames have been
    copied to the host anyway.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.names: list[str] = []
        self.points: list = []
        self._start()

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _start(self) -> None:
        self.points = [self._now()]
        self.names = []

    def mark(self, name: str) -> None:
        self.names.append(name)
        self.points.append(self._now())

    def read(self) -> dict[str, float]:
        if self.cuda:
            self.points[-1].synchronize()
            spans = [a.elapsed_time(b) for a, b in zip(self.points, self.points[1:], strict=False)]
        else:
            spans = [(b - a) * 1e3 for a, b in zip(self.points, self.points[1:], strict=False)]
        out: dict[str, float] = {}
        for name, ms in zip(self.names, spans, strict=True):
            out[name] = out.get(name, 0.0) + ms
        self._start()
        return out


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """No TF32 in matmuls or cuDNN convolutions inside the ``with`` (float32 references)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class WorldPlayPipeline:
    """Holds the models; :meth:`~worldplay.rollout.WorldPlayPipeline.rollout` runs one video."""

    def __init__(self, dit: WanDiT, vae, *, device: torch.device | str, dtype: torch.dtype = torch.bfloat16):
        if not dit.worldplay:
            raise RolloutError("the DiT has no HY-WorldPlay modules (build it with worldplay=True)")
        self.dit = dit
        self.vae = vae
        self.device = torch.device(device)
        self.dtype = dtype

    @torch.no_grad()
    def rollout(
        self,
        image: torch.Tensor,
        text_states: torch.Tensor,
        trajectory: Trajectory,
        settings: RolloutSettings,
    ) -> Iterator[ChunkOutput]:
        """Generate ``settings.num_chunk`` chunks from ``image [3, H, W]`` in [-1, 1] and the
        prompt embeddings ``text_states [1, L, text_dim]``."""
        traj = trajectory.for_chunks(settings.num_chunk)  # errors before any model work
        if settings.linear_dtype == "fp8" and self.dtype != torch.bfloat16:
            raise RolloutError("linear_dtype='fp8' runs with bfloat16 models")
        with contextlib.ExitStack() as stack:
            if settings.linear_dtype == "fp8":
                stack.enter_context(fp8_linears(self.dit))
            if self.dtype == torch.float32:
                stack.enter_context(_no_tf32())  # a float32 run is a reference
            yield from self._rollout(image, text_states, traj, settings)

    def _rollout(self, image, text_states, traj, settings: RolloutSettings) -> Iterator[ChunkOutput]:
        dev, dtype, dit = self.device, self.dtype, self.dit
        if settings.attention_backend in ("cudnn", "fa4") and dev.type != "cuda":
            raise RolloutError(f"attention backend {settings.attention_backend!r} runs only on CUDA GPUs; "
                               "use 'sdpa' on this device")
        if settings.attention_backend == "fa4" and not fa4_usable():
            raise RolloutError("attention backend 'fa4' needs the flash-attn-4 package (pip install "
                               "'worldplay[fa4]') and a Hopper or Blackwell GPU; or use 'cudnn'")
        height, width = image.shape[-2:]
        spatial = self.vae.config.scale_factor_spatial
        if height % (spatial * 2) or width % (spatial * 2):
            raise RolloutError(f"image size {height}x{width} must be a multiple of {spatial * 2} on both sides")
        lh, lw = height // spatial, width // spatial
        channels = dit.config.in_channels
        tokens_per_frame = (lh // 2) * (lw // 2)
        dit.rope_table_dtype = dtype if settings.official_rope_tables else None

        # -- RNG, in the official order -------------------------------------------------
        cpu_gen = torch.Generator().manual_seed(settings.seed)
        dev_gen = torch.Generator(device=dev).manual_seed(settings.seed)
        points = memory_point_cloud(generator=cpu_gen).to(dev)
        noise = torch.randn(1, channels, settings.noise_latents, lh, lw, generator=dev_gen, device=dev,
                            dtype=torch.float32)
        image_latent = self.vae.encode_image(
            image.to(dev, next(self.vae.parameters()).dtype)[None],
            mode=settings.image_latent,
            generator=dev_gen,
        ).float()  # normalised, [1, C, 1, lh, lw]

        # -- per-rollout state, allocated once --------------------------------------------
        num_latents = settings.num_chunk * CHUNK_LATENTS
        history = LatentHistory.allocate(
            1, channels, num_latents, lh, lw,
            torch.tensor(traj.viewmats), torch.tensor(traj.intrinsics), torch.tensor(traj.actions),
            device=dev, dtype=dtype,
        )
        kv = MemoryKV(dit.config.num_layers, 1, 2, tokens_per_frame, dit.config.num_attention_heads,
                      dit.config.attention_head_dim, device=dev, dtype=dtype)
        text = dit.text_context(text_states.to(dev, dtype))
        # Switch the decoder's layout before allocating its state: the history buffers take it.
        if settings.fast_decode != bool(self.vae.fast_decode):
            if settings.fast_decode:
                self.vae.enable_fast_decode()
            else:
                self.vae.disable_fast_decode()
        decode_state = (self.vae.new_decode_state(1, lh, lw, device=dev, dtype=next(self.vae.parameters()).dtype)
                        if settings.decode else None)
        timesteps, sigmas = distilled_schedule()
        timer = StageTimer(dev)
        runner = DiTRunner(dit, settings.accel, settings.attention_backend, settings.fused_kernels)
        self.last_accel_stats = runner.stats
        rope_cache: dict[int, tuple] = {}
        reuse = ReuseState()

        def rope_tables(n_mem: int):
            """(memory, chunk) RoPE tables for N memory frames, built once per N (static)."""
            if n_mem not in rope_cache:
                mem_pos, chunk_pos = memory_positions(n_mem)
                rope_cache[n_mem] = (
                    dit.rope_for(mem_pos, n_mem, lh, lw, dev) if n_mem else None,
                    dit.rope_for(chunk_pos, CHUNK_LATENTS, lh, lw, dev),
                )
            return rope_cache[n_mem]

        for chunk in range(settings.num_chunk):
            cur = chunk * CHUNK_LATENTS
            frames_idx = slice(cur, cur + CHUNK_LATENTS)
            selection = None
            n_mem = 0
            timer.read()  # restart the clock at the chunk boundary (after the host work)
            if cur == MEMORY_SLOTS + CHUNK_LATENTS:  # the first steady chunk (warm-up of graphs) is done
                runner.steady_state_begins()
            if chunk > 0:
                selection = select_memory(history.viewmats, cur, points)
                idx = torch.tensor(selection.indices, device=dev)
                n_mem = idx.numel()
                timer.mark("select")
                if settings.memory_mode == "reuse" and reuse.slot:
                    self._update_reused_memory(reuse, selection.indices, history, text, kv, runner, lh, lw, timer)
                else:
                    mem_latents = history.gather_memory(idx)
                    runner.prefill(
                        mem_latents, torch.full((1, n_mem), CONTEXT_TIMESTEP, device=dev), text, kv, n_mem,
                        rope_tables(n_mem)[0], actions=history.actions[idx][None],
                        viewmats=history.viewmats[idx][None], intrinsics=history.intrinsics[idx][None],
                    )
                    reuse.reset(list(selection.indices), MEMORY_SLOTS)
                timer.mark("prefill")
            master = noise[:, :, frames_idx].clone()
            if chunk == 0:
                master[:, :, :1] = image_latent
            x = master.to(dtype)
            cams = dict(
                actions=history.actions[frames_idx][None], viewmats=history.viewmats[frames_idx][None],
                intrinsics=history.intrinsics[frames_idx][None],
            )
            for step in range(len(timesteps) - 1):
                t = torch.full((1, CHUNK_LATENTS), float(timesteps[step]), device=dev)
                if chunk == 0:
                    t[:, 0] = CONTEXT_TIMESTEP  # the image latent is "almost clean"
                velocity = runner.step(x, t, text, kv, n_mem, rope_tables(n_mem)[1], **cams)
                stepped = euler_step(x, velocity, sigmas[step], sigmas[step + 1])
                if chunk == 0:
                    x[:, :, 1:] = stepped[:, :, 1:]  # the image latent is never updated
                else:
                    x = stepped
                timer.mark(f"step{step}")
            history.latents[:, :, frames_idx] = x
            if not settings.decode:
                frames = torch.empty(0, height, width, 3, dtype=torch.uint8)
            else:
                if self.dtype == torch.float32:
                    # A float32 reference decodes latent by latent (the same frames, see the VAE
                    # tests) to keep the decoder's transient memory to a quarter.
                    video = torch.cat([self.vae.decode(x[:, :, i : i + 1], decode_state)
                                       for i in range(CHUNK_LATENTS)], 2)
                else:
                    video = self.vae.decode(x, decode_state)  # de-normalises in the VAE dtype, as official
                frames_dev = frames_to_uint8(video)
                timer.mark("decode")
                frames = frames_dev.cpu()
            timings = timer.read()
            timings["dit"] = sum(v for k, v in timings.items() if k in ("prefill", "kv_move") or k.startswith("step"))
            yield ChunkOutput(
                index=chunk, frames=frames, latents=x.float().cpu(), memory=selection, timings_ms=timings,
                device_latents=x,
            )
        runner.finish()

    def _update_reused_memory(self, reuse: ReuseState, selected: list[int], history: LatentHistory, text,
                              kv: MemoryKV, runner: DiTRunner, lh: int, lw: int, timer=None) -> None:
        """``reuse`` mode: frames that stay selected keep their slots and K/V; the RoPE-branch
        keys of those whose rank changed are re-rotated in place (temporal features only); the
        newly selected frames are computed (at t = 14, attending to the whole selection, like a
        prefill) into the slots that frames leaving the selection vacated. Nothing is moved."""
        dit, dev = self.dit, self.device
        cfg = dit.config
        tokens = kv.tokens_per_frame
        n = len(selected)
        rank = {f: i for i, f in enumerate(selected)}
        kept, missing = reuse.plan(selected, MEMORY_SLOTS)
        base = MEMORY_SLOTS - n
        deltas = torch.zeros(n, dtype=torch.float64)  # per slot of the valid block
        for f, slot in kept.items():
            deltas[slot - base] = rank[f] - reuse.positions[f]
        if deltas.any():
            # One table row per frame, broadcast over its tokens on the device: per-token tables
            # (float64 on the host, 3.6 MB copied per chunk) left the GPU idle for 16-110 ms
            # while the host built them (bench-h100x2, notes/perf.md).
            cos, sin = temporal_rotation_tables(deltas, 1, cfg.attention_head_dim)
            if dit.rope_table_dtype is not None:
                cos, sin = cos.to(dit.rope_table_dtype).float(), sin.to(dit.rope_table_dtype).float()
            cos, sin = cos[:, None].to(dev), sin[:, None].to(dev)  # [n, 1, d/2]
            batch = kv.k.shape[1] // 2  # rows [0, B): RoPE branch; [B, 2B): PRoPE branch (position-free)
            block = kv.memory_tokens(n)
            group = 6  # layers per pass: bounds the float32 temporaries (~1.5 GB at 704x1280)
            for l0 in range(0, cfg.num_layers, group):
                keys = kv.k[l0 : l0 + group, :batch, block].unflatten(2, (n, tokens))  # [.., n, S, H, d]
                rotate_temporal(keys, cos, sin)
        if timer is not None:
            timer.mark("kv_move")
        if missing:
            frames = [f for f, _ in missing]
            idx = torch.tensor(frames, device=dev)
            write = torch.cat([torch.arange(s * tokens, (s + 1) * tokens) for _, s in missing]).to(dev)
            positions = torch.tensor([rank[f] for f in frames], dtype=torch.float64)
            runner.partial_prefill(
                history.latents.index_select(2, idx), torch.full((1, len(frames)), CONTEXT_TIMESTEP, device=dev),
                text, kv, n, write, dit.rope_for(positions, len(frames), lh, lw, dev),
                actions=history.actions[idx][None], viewmats=history.viewmats[idx][None],
                intrinsics=history.intrinsics[idx][None],
            )
        reuse.commit(selected, kept, missing)
