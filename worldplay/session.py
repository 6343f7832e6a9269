"""One world, stepped chunk by chunk: an image and a prompt, then one action per chunk -> frames.

:class:`WorldSession` is the one code path of generation. :meth:`WorldPlayPipeline.rollout
<worldplay.rollout.WorldPlayPipeline.rollout>` is a loop over a session with a scripted
trajectory; the live server (:mod:`worldplay.serve`) steps one with the keys a player holds.
Everything that is worth keeping between chunks lives in the session and persists across
:meth:`~WorldSession.step` calls: the latent history, the memory K/V buffers, the noise, the
streaming decoder state, the runners (compiled blocks, CUDA graphs). :meth:`~WorldSession.reset`
starts the world over (optionally from another image or prompt) in those same buffers, so the
graphs captured for them stay valid.

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
``noise_latents``, 241 in the official CLI), then the image latent's posterior sample. A session
that runs past ``noise_latents`` draws the next block of ``noise_latents`` latents from the same
device generator when it needs it (:class:`NoiseStream`): deterministic, and a rollout that fits
the first block never sees the difference.

Several ranks (``pipe.ranks``, a :class:`worldplay.ranks.group.RankGroup`): every rank runs the same
session on the same inputs (the same seeds, so the same noise and memory selections), each
holding its share of the DiT's tokens, of the memory K/V (its heads) and of the decoder's columns
(:mod:`worldplay.ranks`); the chunk's latents come out whole on every rank, the frames are
gathered, and only rank 0 (the leader) copies them to the host. One rank is the same code with
no shares.

Open-ended sessions: the latent history is preallocated for ``settings.num_chunk`` chunks and
doubles (at a chunk boundary, outside the CUDA-graph calls, which never read it directly) when
a session runs longer. Memory selection considers every earlier clip, as the official code does;
its cost grows with the number of chunks (one overlap test per candidate clip).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch

from .accel import AccelStats, DiTRunner
from .actions import ChunkPoses, Motion, Steering
from .decode_runner import DecodeOptions, DecodeRunner
from .media import frames_to_uint8
from .memory import (
    CHUNK_LATENTS,
    CONTEXT_TIMESTEP,
    MEMORY_SLOTS,
    LatentHistory,
    MemoryKV,
    ReuseState,
    memory_positions,
    new_memory_kv,
)
from .memory_select import memory_point_cloud, select_memory
from .nn.attention import fa4_usable
from .nn.dit import TextContext, round_rope_tables
from .nn.rope import rotate_temporal, temporal_rotation_tables
from .nn.vae import DecodeState
from .rollout import ChunkOutput, RolloutError, RolloutSettings, WorldPlayPipeline, no_tf32
from .sampler import distilled_schedule, euler_step
from .timing import StageTimer

__all__ = ["NoiseStream", "SessionParts", "WorldSession", "build_parts"]


class NoiseStream:
    """The per-latent noise of a session, drawn block by block from one device generator.

    The first block is the official draw (``noise_latents`` latents, right after the seed);
    further blocks of the same size come from the same generator when a chunk reaches past the
    drawn latents. Latents already consumed are dropped then, so a long session holds at most
    one block and a chunk."""

    def __init__(self, first: torch.Tensor, generator: torch.Generator):
        self.generator = generator
        self.block = first.shape[2]
        self.buffer = first
        self.offset = 0  # latent index of buffer[:, :, 0]

    def take(self, start: int, count: int) -> torch.Tensor:
        """Noise of latents ``start .. start + count - 1`` (a view; ``start`` never goes back)."""
        if start < self.offset:
            raise ValueError(f"noise of latent {start} was dropped (the stream is at {self.offset})")
        while start + count > self.offset + self.buffer.shape[2]:
            kept = self.buffer[:, :, start - self.offset :]
            more = torch.randn(*self.buffer.shape[:2], self.block, *self.buffer.shape[3:], generator=self.generator,
                               device=self.buffer.device, dtype=self.buffer.dtype)
            self.buffer, self.offset = torch.cat([kept, more], 2), start
        return self.buffer[:, :, start - self.offset : start - self.offset + count]


@dataclass
class SessionParts:
    """The runners and buffers of a session, made from its settings by :func:`build_parts`."""

    runner: DiTRunner
    kv: MemoryKV
    history: LatentHistory
    decoder: DecodeRunner | None
    decode_state: DecodeState | None
    ranks: int = 1  # ranks the session runs over


def build_parts(pipe: WorldPlayPipeline, settings: RolloutSettings, decode_options: DecodeOptions, *,
                latent_h: int, latent_w: int, capacity: int) -> SessionParts:
    """Every runner and buffer a session needs, from ``settings``: the one place they are made.
    ``capacity``: latents the history holds before it has to grow."""
    dev, dtype, dit = pipe.device, pipe.dtype, pipe.dit
    heads = dit.config.num_attention_heads
    tokens_per_frame = (latent_h // 2) * (latent_w // 2)
    shards, columns, size = None, None, 1
    if pipe.ranks is not None:
        size = pipe.ranks.size
        try:
            shards = pipe.ranks.token_shards(tokens_per_frame, heads)
            columns = pipe.ranks.column_shards(latent_w) if settings.decode else None
        except ValueError as exc:
            raise RolloutError(str(exc)) from None
    history = _history(pipe, capacity, latent_h, latent_w)
    # Over several ranks each holds every token's keys/values for its heads.
    kv = new_memory_kv(settings.kv_dtype, dit.config.num_layers, 1, 2, tokens_per_frame, heads // size,
                       dit.config.attention_head_dim, device=dev, dtype=dtype,
                       lend_pool=settings.release_kv_for_decode)
    # The decode runner allocates the decoder's history in its own layout.
    decoder = pipe.decode_runner(decode_options) if settings.decode else None
    decode_state = (decoder.new_decode_state(1, latent_h, latent_w, device=dev, dtype=pipe.vae_dtype, columns=columns)
                    if decoder is not None else None)
    runner = DiTRunner(dit, settings.accel, settings.attention_backend, settings.fused_kernels,
                       fp8=pipe.fp8_linears() if settings.linear_dtype == "fp8" else None,
                       placed=pipe.placed_dit(settings), shards=shards)
    return SessionParts(runner=runner, kv=kv, history=history, decoder=decoder, decode_state=decode_state,
                        ranks=size)


def _history(pipe: WorldPlayPipeline, capacity: int, latent_h: int, latent_w: int) -> LatentHistory:
    """An empty history of ``capacity`` latents (poses and actions are written chunk by chunk)."""
    return LatentHistory.allocate(
        1, pipe.dit.config.in_channels, capacity, latent_h, latent_w,
        torch.zeros(capacity, 4, 4), torch.zeros(capacity, 3, 3), torch.zeros(capacity),
        device=pipe.device, dtype=pipe.dtype,
    )


class WorldSession:
    """One world from ``image [3, H, W]`` in [-1, 1] and the prompt embeddings
    ``text_states [1, L, text_dim]``, generated one chunk per step.

    :meth:`step` generates the next chunk, :meth:`reset` starts over.
    Live controls are labelled as the official first-person mode does, or with ``third_person``
    as its ``tps=True`` mode (:class:`~worldplay.actions.Steering`).

    The history is preallocated for ``preallocate`` chunks (default ``settings.num_chunk``); a
    session may run longer (it grows). ``decode_options``: decoder options other than those ``settings.fast_decode``
    chooses (probes of decode variants). Make one with :meth:`WorldPlayPipeline.session
    <worldplay.rollout.WorldPlayPipeline.session>`."""

    def __init__(self, pipe: WorldPlayPipeline, image: torch.Tensor, text_states: torch.Tensor,
                 settings: RolloutSettings, *, decode_options: DecodeOptions | None = None,
                 preallocate: int | None = None, third_person: bool = False):
        dev = pipe.device
        preallocate = settings.num_chunk if preallocate is None else preallocate
        if isinstance(preallocate, bool) or not isinstance(preallocate, int) or preallocate < 1:
            raise RolloutError(f"preallocate must be a positive number of chunks, got {preallocate!r}")
        if settings.linear_dtype == "fp8" and pipe.dtype != torch.bfloat16:
            raise RolloutError("linear_dtype='fp8' runs with bfloat16 models")
        if settings.attention_backend in ("cudnn", "fa4") and dev.type != "cuda":
            raise RolloutError(f"attention backend {settings.attention_backend!r} runs only on CUDA GPUs; "
                               "use 'sdpa' on this device")
        if settings.attention_backend == "fa4" and not fa4_usable():
            raise RolloutError("attention backend 'fa4' needs the flash-attn-4 package (pip install "
                               "'worldplay[fa4]') and a Hopper or Blackwell GPU; or use 'cudnn'")
        self.pipe = pipe
        self.settings = settings
        self.size = self._check_image(image)
        spatial = pipe.vae.config.scale_factor_spatial
        self.latent_h, self.latent_w = self.size[0] // spatial, self.size[1] // spatial
        # The official model stores its RoPE tables in its dtype (see round_rope_tables).
        self._table_dtype = pipe.dtype if settings.official_rope_tables else None
        if decode_options is None:
            decode_options = DecodeOptions.for_settings(settings)
        self.parts = build_parts(pipe, settings, decode_options, latent_h=self.latent_h, latent_w=self.latent_w,
                                 capacity=preallocate * CHUNK_LATENTS)
        pipe.last_accel_stats = self.parts.runner.stats
        self.steering = Steering(third_person=third_person)
        self._timesteps, self._sigmas = distilled_schedule()
        self._timer = StageTimer(dev)
        self._rope_cache: dict[int, tuple] = {}
        self._text: TextContext | None = None
        self._begin(image, text_states)

    # -- public -----------------------------------------------------------------------------

    @property
    def chunk(self) -> int:
        """Index of the chunk the next :meth:`step` generates."""
        return self._chunk

    def step(self, control: ChunkPoses | Motion | int | np.ndarray) -> ChunkOutput:
        """Generate the next chunk and return its frames (decoded), latents, memory and timings.

        ``control``: the chunk's camera data (:class:`~worldplay.actions.ChunkPoses`, e.g. from a
        scripted trajectory), or a live control held for the whole chunk: a
        :class:`~worldplay.actions.Motion`, an official action label (0..80), or a relative
        camera transform ``[4, 4]`` per latent step (see :class:`~worldplay.actions.Steering`)."""
        poses = control if isinstance(control, ChunkPoses) else self.steering.chunk(control)
        with self._precision():
            out = self._generate(poses)
        self.steering.follow(poses)
        self.last_poses = poses
        self._chunk += 1
        return out

    def reset(self, image: torch.Tensor | None = None, text_states: torch.Tensor | None = None) -> None:
        """Start the world over, from ``image``/``text_states`` where given (else the current
        ones), in the same buffers: the runners' compiled functions and graphs stay valid. The
        image must keep the session's size."""
        if image is not None and self._check_image(image) != self.size:
            raise RolloutError(f"the session runs at {self.size[0]}x{self.size[1]}; an image of another size "
                               "needs a new session")
        self._begin(self._image if image is None else image,
                    self._text_states if text_states is None else text_states)

    def finish(self) -> AccelStats:
        """The runner's counters (recompiles in the steady state included)."""
        return self.parts.runner.finish()

    # -- internals --------------------------------------------------------------------------

    def _check_image(self, image: torch.Tensor) -> tuple[int, int]:
        if image.ndim != 3 or image.shape[0] != 3:
            raise RolloutError(f"image must be [3, H, W], got {tuple(image.shape)}")
        height, width = image.shape[-2:]
        spatial = self.pipe.vae.config.scale_factor_spatial
        if height % (spatial * 2) or width % (spatial * 2):
            raise RolloutError(f"image size {height}x{width} must be a multiple of {spatial * 2} on both sides")
        return int(height), int(width)

    def _precision(self):
        # A float32 run is a reference: no TF32 in its matmuls and convolutions.
        return no_tf32() if self.pipe.dtype == torch.float32 else contextlib.nullcontext()

    @torch.no_grad()
    def _begin(self, image: torch.Tensor, text_states: torch.Tensor) -> None:
        """Chunk 0 state: the RNG draws in the official order, the image latent, the prompt."""
        pipe, settings, dev = self.pipe, self.settings, self.pipe.device
        with self._precision():
            cpu_gen = torch.Generator().manual_seed(settings.seed)
            dev_gen = torch.Generator(device=dev).manual_seed(settings.seed)
            self._points = memory_point_cloud(generator=cpu_gen).to(dev)
            noise = torch.randn(1, pipe.dit.config.in_channels, settings.noise_latents, self.latent_h, self.latent_w,
                                generator=dev_gen, device=dev, dtype=torch.float32)
            self._noise = NoiseStream(noise, dev_gen)
            self._image_latent = pipe.vae.encode_image(
                image.to(dev, pipe.vae_dtype)[None], mode=settings.image_latent, generator=dev_gen,
            ).float()  # normalised, [1, C, 1, lh, lw]
            self._set_text(text_states)
        self._image, self._text_states = image, text_states
        if self.parts.decode_state is not None:
            self.parts.decode_state.reset()  # in place: a decode graph of this state stays valid
        self._reuse = ReuseState()
        self.steering.reset()
        self.last_poses: ChunkPoses | None = None  # what the last chunk was conditioned on
        self._chunk = 0

    def _set_text(self, text_states: torch.Tensor) -> None:
        """The prompt's cross-attention K/V, written into the session's tensors when it has them
        (captured CUDA graphs read those addresses)."""
        fresh = self.parts.runner.text_context(text_states.to(self.pipe.device, self.pipe.dtype))
        if self._text is None:
            self._text = fresh
            return
        shapes = [tuple(t.shape) for pair in self._text.kv for t in pair]
        if shapes != [tuple(t.shape) for pair in fresh.kv for t in pair]:
            raise RolloutError("the new prompt embeddings have another shape than the session's; start a new "
                               "session for them")
        for old, new in zip(self._text.kv, fresh.kv, strict=True):
            old[0].copy_(new[0])
            old[1].copy_(new[1])

    def _rope_tables(self, n_mem: int):
        """(memory, chunk) RoPE tables for N memory frames, built once per N (static)."""
        if n_mem not in self._rope_cache:
            dit, dev, lh, lw = self.pipe.dit, self.pipe.device, self.latent_h, self.latent_w
            mem_pos, chunk_pos = memory_positions(n_mem)
            self._rope_cache[n_mem] = (
                dit.rope_for(mem_pos, n_mem, lh, lw, dev, self._table_dtype) if n_mem else None,
                dit.rope_for(chunk_pos, CHUNK_LATENTS, lh, lw, dev, self._table_dtype),
            )
        return self._rope_cache[n_mem]

    def _reserve(self, latents: int) -> LatentHistory:
        """The history, grown (doubled) to hold ``latents`` when it is too short."""
        history = self.parts.history
        capacity = history.latents.shape[2]
        if latents > capacity:
            while capacity < latents:
                capacity *= 2
            grown = _history(self.pipe, capacity, self.latent_h, self.latent_w)
            used = self._chunk * CHUNK_LATENTS
            for name in ("latents", "viewmats", "intrinsics", "actions"):
                old, new = getattr(history, name), getattr(grown, name)
                (new[:, :, :used] if name == "latents" else new[:used]).copy_(
                    old[:, :, :used] if name == "latents" else old[:used])
            self.parts.history = history = grown
        return history

    @torch.no_grad()
    def _generate(self, poses: ChunkPoses) -> ChunkOutput:
        dev, dtype = self.pipe.device, self.pipe.dtype
        runner, kv, text, timer = self.parts.runner, self.parts.kv, self._text, self._timer
        timesteps, sigmas = self._timesteps, self._sigmas
        chunk = self._chunk
        cur = chunk * CHUNK_LATENTS
        frames_idx = slice(cur, cur + CHUNK_LATENTS)
        history = self._reserve(cur + CHUNK_LATENTS)
        # float64 -> float32 on the device, as the official pipeline buffers its poses.
        history.viewmats[frames_idx] = torch.tensor(poses.viewmats).to(dev, torch.float32)
        history.intrinsics[frames_idx] = torch.tensor(poses.intrinsics).to(dev, torch.float32)
        history.actions[frames_idx] = torch.tensor(poses.actions).to(dev, torch.float32)
        selection = None
        n_mem = 0
        timer.read()  # restart the clock at the chunk boundary (after the host work)
        if cur == MEMORY_SLOTS + CHUNK_LATENTS:  # the first steady chunk (warm-up of graphs) is done
            runner.steady_state_begins()
        if chunk > 0:
            selection = select_memory(history.viewmats[: cur + CHUNK_LATENTS], cur, self._points)
            idx = torch.tensor(selection.indices, device=dev)
            n_mem = idx.numel()
            timer.mark("select")
            if self.settings.memory_mode == "reuse" and self._reuse.slot:
                self._update_reused_memory(selection.indices, history, timer)
            else:
                mem_latents = history.gather_memory(idx)
                runner.prefill(
                    mem_latents, torch.full((1, n_mem), CONTEXT_TIMESTEP, device=dev), text, kv, n_mem,
                    self._rope_tables(n_mem)[0], actions=history.actions[idx][None],
                    viewmats=history.viewmats[idx][None], intrinsics=history.intrinsics[idx][None],
                )
                self._reuse.reset(list(selection.indices), MEMORY_SLOTS)
            timer.mark("prefill")
        master = self._noise.take(cur, CHUNK_LATENTS).clone()
        if chunk == 0:
            master[:, :, :1] = self._image_latent
        x = master.to(dtype)
        cams = dict(
            actions=history.actions[frames_idx][None], viewmats=history.viewmats[frames_idx][None],
            intrinsics=history.intrinsics[frames_idx][None],
        )
        for step in range(len(timesteps) - 1):
            t = torch.full((1, CHUNK_LATENTS), float(timesteps[step]), device=dev)
            if chunk == 0:
                t[:, 0] = CONTEXT_TIMESTEP  # the image latent is "almost clean"
            velocity = runner.step(x, t, text, kv, n_mem, self._rope_tables(n_mem)[1], **cams)
            stepped = euler_step(x, velocity, sigmas[step], sigmas[step + 1])
            if chunk == 0:
                x[:, :, 1:] = stepped[:, :, 1:]  # the image latent is never updated
            else:
                x = stepped
            timer.mark(f"step{step}")
        history.latents[:, :, frames_idx] = x
        # release_kv_for_decode: the K/V is dead until the next prefill; the decode runs in its
        # memory (MemoryKV.lent), and only the frames on the host leave it.
        with self.parts.kv.lent() if self.settings.release_kv_for_decode else contextlib.nullcontext():
            frames = self._decode(x, timer)
        timings = timer.read()
        timings["dit"] = sum(v for k, v in timings.items() if k in ("prefill", "kv_move") or k.startswith("step"))
        return ChunkOutput(
            index=chunk, frames=frames, latents=x.float().cpu(), memory=selection, timings_ms=timings,
            device_latents=x, clock_s={"ready": time.perf_counter()},
        )

    def _decode(self, x: torch.Tensor, timer) -> torch.Tensor:
        """The chunk's clean latents -> uint8 frames ``[T, H, W, 3]`` on the host (empty
        without a decoder here, or on a rank that is not the leader)."""
        dtype = self.pipe.dtype
        if self.parts.decoder is None:
            return torch.empty(0, *self.size, 3, dtype=torch.uint8)
        decoder, state = self.parts.decoder, self.parts.decode_state
        if dtype == torch.float32:
            # A float32 reference decodes latent by latent (the same frames, see the VAE
            # tests) to keep the decoder's transient memory to a quarter.
            video = torch.cat([decoder.decode(x[:, :, i : i + 1], state) for i in range(CHUNK_LATENTS)], 2)
        else:
            video = decoder.decode(x, state)  # de-normalises in the VAE dtype, as official
        frames_dev = frames_to_uint8(video)
        if state.columns is not None:  # every rank's columns of the frames
            frames_dev = state.columns.gather_frames(frames_dev)
        timer.mark("decode")
        leader = self.pipe.ranks is None or self.pipe.ranks.leader
        return frames_dev.cpu() if leader else torch.empty(0, *self.size, 3, dtype=torch.uint8)

    def _update_reused_memory(self, selected: list[int], history: LatentHistory, timer=None) -> None:
        """``reuse`` mode: frames that stay selected keep their slots and K/V; the RoPE-branch
        keys of those whose rank changed are re-rotated in place (temporal features only); the
        newly selected frames are computed (at t = 14, attending to the whole selection, like a
        prefill) into the slots that frames leaving the selection vacated. Nothing is moved."""
        dit, dev, reuse, kv = self.pipe.dit, self.pipe.device, self._reuse, self.parts.kv
        table_dtype, lh, lw = self._table_dtype, self.latent_h, self.latent_w
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
            # while the host built them (bench-2gpu, first run as bench-h100x2; notes/perf.md).
            cos, sin = round_rope_tables(*temporal_rotation_tables(deltas, 1, cfg.attention_head_dim), table_dtype)
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
            self.parts.runner.partial_prefill(
                history.latents.index_select(2, idx), torch.full((1, len(frames)), CONTEXT_TIMESTEP, device=dev),
                self._text, kv, n, write, dit.rope_for(positions, len(frames), lh, lw, dev, table_dtype),
                actions=history.actions[idx][None], viewmats=history.viewmats[idx][None],
                intrinsics=history.intrinsics[idx][None],
            )
        reuse.commit(selected, kept, missing)
