"""The Wan 2.2 TI2V-5B diffusion transformer, natively.

Parameter names equal diffusers' ``WanTransformer3DModel`` (which is also what the HY-WorldPlay
checkpoint stores after stripping its wrapper prefixes), so checkpoints load with strict key
checking and no remapping table.

Conventions:

* Tokens are frame-major: ``token = f * S + h * W' + w`` with ``S = H' * W'`` tokens per frame.
* Timesteps are given per latent frame (``[B, F]``) — the HY-WorldPlay usage, where the image
  or memory frames sit at t=14 while the chunk denoises — or per token (``[B, F*S]``), the
  diffusers TI2V form. Modulation is computed once per distinct timestep and broadcast over
  the frame's tokens instead of being materialised per token.
* Precision follows the official code: LayerNorms, modulation and gated residual sums in
  float32, RoPE rotation in float32, everything else in the parameter dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import DiTConfig
from .attention import attention
from .fused import (
    linear_gelu_tanh,
    rms_norm,
    rotate_and_store,
    rotate_and_store_reference,
    rotate_branches,
    stack_branches,
    store_kv,
)
from .parallel import TokenShards
from .prope import PRoPE, apply_per_frame
from .rope import rope_tables


def timestep_sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``[cos(t w_i), sin(t w_i)]`` with ``w_i = 10000^(-i/(dim/2))``, float32 (cosine half first)."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    angles = t.reshape(-1, 1).float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class _MLP2(nn.Module):
    """Linear -> activation -> Linear, with diffusers' ``linear_1`` / ``linear_2`` names."""

    def __init__(self, in_dim: int, dim: int, act: nn.Module):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = act
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class ConditionEmbedder(nn.Module):
    """Timestep (+ HY action) -> ``temb`` and the six AdaLN vectors; text -> model width."""

    def __init__(self, config: DiTConfig, with_actions: bool):
        super().__init__()
        dim = config.dim
        self.freq_dim = config.freq_dim
        self.time_embedder = _MLP2(config.freq_dim, dim, nn.SiLU())
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = _MLP2(config.text_dim, dim, nn.GELU(approximate="tanh"))
        # HY-WorldPlay: an 81-class action label goes through the *same* sinusoid as the
        # timestep and a new MLP, and is added to temb before the AdaLN projection.
        self.action_embedder = _MLP2(config.freq_dim, dim, nn.SiLU()) if with_actions else None

    def forward(
        self, timesteps: torch.Tensor, actions: torch.Tensor | None, out_dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat ``timesteps [N]`` (and ``actions [N]``) -> ``temb [N, D]``, ``e [N, 6, D]``."""
        w = self.time_embedder.linear_1.weight
        temb = self.time_embedder(timestep_sinusoid(timesteps, self.freq_dim).to(w.dtype)).to(out_dtype)
        if actions is not None:
            if self.action_embedder is None:
                raise ValueError("actions were given but this model has no action embedder")
            # The official code casts labels to the model dtype first (exact for 0..80).
            a = timestep_sinusoid(actions.to(out_dtype), self.freq_dim).to(w.dtype)
            temb = temb + self.action_embedder(a).to(out_dtype)
        e = self.time_proj(F.silu(temb)).unflatten(-1, (6, -1))
        return temb, e


class RMSNorm(nn.Module):
    """RMSNorm as the official model computes it: statistics in float32, the normalised value
    rounded to the input dtype, then multiplied by the weight in that dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


@dataclass
class SelfAttnInputs:
    """What every block's attention needs for one call (shared by all layers).

    ``rope``: cos/sin tables of the query tokens. ``prope``: per-frame camera matrices of the
    query frames (HY-WorldPlay), or None. With a K/V buffer (see ``worldplay.memory``), this
    call's keys/values are written in place to tokens ``write`` of the buffer and the queries
    attend to tokens ``read``; without one, tokens attend to each other. ``backend``: the
    attention backend of self- and cross-attention (``worldplay.nn.attention``). ``shards``:
    this rank's tokens of a DiT over several ranks (:mod:`worldplay.nn.parallel`), or None.
    """

    rope: tuple[torch.Tensor, torch.Tensor]
    prope: PRoPE | None = None
    write: slice | torch.Tensor | None = None  # token range, or token indices (LongTensor)
    read: slice | None = None
    mask: torch.Tensor | None = None  # boolean keep-mask [Lq, Lk] (tests and references only)
    # worldplay.nn.fused: one pass for q/k norm, RoPE, PRoPE and the K/V store (with a K/V
    # buffer), and the FFN's GELU in its GEMM epilogue.
    fused: bool = False
    backend: str = "sdpa"
    shards: TokenShards | None = None


@torch.compiler.disable
def _store_and_attend(attn, q, k, v, inputs: SelfAttnInputs, kv_buffer, *, rotated: bool = False):
    """The one way keys/values reach a K/V buffer: store this call's K/V at tokens
    ``inputs.write``, then (given queries) attend to tokens ``inputs.read``. Returns the
    attention output ``[branches*B, L, H, d]``, or None without queries (the last block of a
    memory prefill, whose queries nothing uses).

    ``rotated=False``: ``q`` (or None), ``k``, ``v`` are the GEMM outputs ``[B, L, H*d]``; the
    q/k norm, RoPE and PRoPE happen on the way into the buffer, in one Triton pass with
    ``inputs.fused`` on CUDA, else in PyTorch (:mod:`worldplay.nn.fused`). ``rotated=True``:
    the caller did that work inside its compiled block, where inductor fuses it; ``q`` holds both
    branches' queries, ``k`` and ``v`` the per-branch lists.

    Always eager: inside a compiled graph, inductor turns the in-place slice store into a copy
    of the whole buffer and gives the SDPA kernel contiguous copies of the strided buffer views:
    ~100 ms of memory traffic per steady chunk at 704x1280 (profiled, notes/perf.md). Eagerly,
    the store touches only the written slots and the kernels read the views as they are. Under
    CUDA-graph capture this eager island costs no launch overhead.

    Over several ranks (``inputs.shards``; ``rotated=False``) the GEMM outputs are this rank's
    tokens with all heads: q and k are RMS-normalised here (the norm spans every head of a
    token), then one all-to-all hands each rank every token of its heads, RoPE/PRoPE and the
    store run on those heads (the K/V buffer holds this rank's heads only), and the output goes
    back to this rank's tokens (:mod:`worldplay.ranks.sequence`). Only the bytes of q, k and v
    (one branch) travel in, and the output (both branches) travels back."""
    heads, norm_q, norm_k = attn.heads, attn.norm_q.weight, attn.norm_k.weight
    shards = inputs.shards
    if shards is not None:
        if rotated:
            raise ValueError("keys rotated before the exchange between ranks: call with the GEMM outputs")
        q = None if q is None else rms_norm(q, norm_q, attn.norm_q.eps)
        k = rms_norm(k, norm_k, attn.norm_k.eps)
        exchanged = shards.to_heads([k, v] if q is None else [q, k, v], heads)
        q, (k, v) = (None, exchanged) if q is None else (exchanged[0], exchanged[1:])
        heads, norm_q, norm_k = heads // shards.size, None, None
    # A quantised store (worldplay.memory.Fp8MemoryKV) hands out bf16 work buffers: the memory
    # keys/values this call reads but does not write are dequantised into them, this call's exact
    # keys/values are written to them (and its memory tokens quantised into the store).
    work = getattr(kv_buffer, "work", None)
    if work is not None:
        kv_buffer.load(inputs.read, inputs.write)
    target = kv_buffer if work is None else work
    if rotated:
        store_kv(k, v, target, inputs.write)
    else:
        store = rotate_and_store if inputs.fused else rotate_and_store_reference
        q = store(q, k, v, norm_q, norm_k, attn.norm_k.eps, inputs.rope, inputs.prope, target, inputs.write, heads)
    if work is not None:
        kv_buffer.save(inputs.write)
    if q is None:
        return None
    k_all, v_all = target[0][:, inputs.read], target[1][:, inputs.read]
    o = attention(q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2), backend=inputs.backend,
                  mask=inputs.mask)
    o = o.transpose(1, 2)  # [branches*B, L, H, d]
    return o if shards is None else shards.to_tokens(o)


class _Attention(nn.Module):
    """The projections shared by self- and cross-attention (diffusers names): q, k, v, out and
    RMSNorm of q and k across all heads."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.dim
        self.heads = config.num_attention_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.norm_q = RMSNorm(dim, config.eps)
        self.norm_k = RMSNorm(dim, config.eps)


class SelfAttention(_Attention):
    """Self-attention with q/k RMSNorm across heads and 3-D RoPE (+ HY's PRoPE output branch)."""

    def __init__(self, config: DiTConfig, with_prope: bool):
        super().__init__(config)
        self.to_out_prope = nn.ModuleList([nn.Linear(config.dim, config.dim)]) if with_prope else None

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [B, L, D]`` -> q, k, v ``[B, L, H, d]`` (q, k normalised, not yet rotated)."""
        q = self.norm_q(self.to_q(x)).unflatten(-1, (self.heads, -1))
        k = self.norm_k(self.to_k(x)).unflatten(-1, (self.heads, -1))
        v = self.to_v(x).unflatten(-1, (self.heads, -1))
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        inputs: SelfAttnInputs,
        kv_buffer: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        batch = x.shape[0]
        if inputs.shards is not None and kv_buffer is None:
            raise ValueError("a DiT over several ranks attends through a K/V buffer (kv_buffers)")
        if (inputs.fused or inputs.shards is not None) and kv_buffer is not None:
            o = _store_and_attend(self, self.to_q(x), self.to_k(x), self.to_v(x), inputs, kv_buffer)
            return self._output(o, inputs, batch)
        q, k, v = self.project(x)
        qs, ks, vs = rotate_branches(q, k, v, inputs.rope, inputs.prope)
        q_all = stack_branches(qs)
        if kv_buffer is None:
            o = attention(
                q_all.transpose(1, 2), stack_branches(ks).transpose(1, 2), stack_branches(vs).transpose(1, 2),
                backend=inputs.backend, mask=inputs.mask,
            ).transpose(1, 2)  # [branches*B, L, H, d]
        else:
            o = _store_and_attend(self, q_all, ks, vs, inputs, kv_buffer, rotated=True)
        return self._output(o, inputs, batch)

    def store_kv_only(
        self, x: torch.Tensor, inputs: SelfAttnInputs, kv_buffer: tuple[torch.Tensor, torch.Tensor]
    ) -> None:
        """Only this call's keys/values, into the buffer (the last block of a memory prefill)."""
        _store_and_attend(self, None, self.to_k(x), self.to_v(x), inputs, kv_buffer)

    def _output(self, o: torch.Tensor, inputs: SelfAttnInputs, batch: int) -> torch.Tensor:
        """Both branches' attention output ``[branches*B, L, H, d]`` -> ``[B, L, D]``."""
        out = self.to_out[0](o[:batch].flatten(2))
        if inputs.prope is not None:
            o_p = apply_per_frame(o[batch:], inputs.prope.o)
            out = out + self.to_out_prope[0](o_p.flatten(2))
        return out


class CrossAttention(_Attention):
    """Text cross-attention; the text keys/values are computed once per prompt (:meth:`text_kv`)."""

    def text_kv(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected text ``[B, Lt, D]`` -> k, v ``[B, H, Lt, d]``."""
        k = self.norm_k(self.to_k(text)).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        v = self.to_v(text).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        return k, v

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], backend: str = "sdpa") -> torch.Tensor:
        q = self.norm_q(self.to_q(x)).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        o = attention(q, kv[0], kv[1], backend=backend)
        return self.to_out[0](o.transpose(1, 2).flatten(2))


class _GeluTanhProj(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        # Index 1 is diffusers' (parameter-free) dropout; keeping the slot keeps the key names.
        self.net = nn.ModuleList([_GeluTanhProj(dim, inner), nn.Identity(), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        up = self.net[0].proj
        if fused and type(up) is nn.Linear:  # not an fp8 layer (worldplay.nn.fp8)
            return self.net[2](linear_gelu_tanh(x, up.weight, up.bias))
        return self.net[2](self.net[0](x))


def _layer_norm32(x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps)


class Block(nn.Module):
    """One Wan transformer block; modulation ``mod [B, F, St, 6, D]`` broadcasts over a frame."""

    def __init__(self, config: DiTConfig, with_prope: bool):
        super().__init__()
        dim = config.dim
        self.eps = config.eps
        self.attn1 = SelfAttention(config, with_prope)
        self.attn2 = CrossAttention(config)
        # diffusers' `norm2` is the affine LayerNorm before cross-attention (original Wan: norm3).
        self.norm2 = nn.LayerNorm(dim, eps=config.eps, elementwise_affine=True)
        self.ffn = FeedForward(dim, config.ffn_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        e: torch.Tensor,
        text_kv: tuple[torch.Tensor, torch.Tensor],
        attn_inputs: SelfAttnInputs,
        kv_buffer: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        batch, num_frames, per_frame = e.shape[0], e.shape[1], x.shape[1] // e.shape[1]
        mod = self.scale_shift_table.float() + e.float()  # [B, F, St, 6, D], fp32 as official
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(dim=-2)
        dtype = x.dtype

        def frames(t: torch.Tensor) -> torch.Tensor:  # [B, L, D] <-> [B, F, S, D]
            return t.view(batch, num_frames, per_frame, -1)

        y = (frames(_layer_norm32(x, self.eps)) * (1 + scale1) + shift1).to(dtype)
        attn = self.attn1(y.flatten(1, 2), attn_inputs, kv_buffer)
        x = (frames(x.float()) + frames(attn) * gate1).to(dtype).flatten(1, 2)

        y = F.layer_norm(x.float(), (x.shape[-1],), self.norm2.weight.float(), self.norm2.bias.float(), self.eps)
        x = x + self.attn2(y.to(dtype), text_kv, attn_inputs.backend)

        y = (frames(_layer_norm32(x, self.eps)) * (1 + scale2) + shift2).to(dtype)
        ff = self.ffn(y.flatten(1, 2), fused=attn_inputs.fused)
        return (frames(x.float()) + frames(ff.float()) * gate2).to(dtype).flatten(1, 2)

    def write_kv_only(
        self,
        x: torch.Tensor,
        e: torch.Tensor,
        attn_inputs: SelfAttnInputs,
        kv_buffer: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        """The last block of a memory prefill: only its keys/values are used, so skip the
        queries, the attention, cross-attention and the FFN (the official code computes and
        discards them)."""
        batch, num_frames, per_frame = e.shape[0], e.shape[1], x.shape[1] // e.shape[1]
        mod = self.scale_shift_table.float() + e.float()
        shift1, scale1 = mod[..., 0, :], mod[..., 1, :]
        y = (_layer_norm32(x, self.eps).view(batch, num_frames, per_frame, -1) * (1 + scale1) + shift1)
        self.attn1.store_kv_only(y.to(x.dtype).flatten(1, 2), attn_inputs, kv_buffer)


class KVBuffers:
    """Interface of a per-layer K/V store (``worldplay.memory.MemoryKV`` implements it)."""

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - protocol
        raise NotImplementedError


@dataclass
class TextContext:
    """Per-prompt cross-attention keys/values of every block, computed once per rollout."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]


class WanDiT(nn.Module):
    """Wan 2.2 TI2V DiT. ``worldplay=True`` adds HY-WorldPlay's action embedder and PRoPE output
    projections (zero-initialised, so the extended model starts equal to the backbone)."""

    def __init__(self, config: DiTConfig, worldplay: bool = False):
        super().__init__()
        self.config = config
        self.worldplay = worldplay
        dim = config.dim
        out_features = config.out_channels * math.prod(config.patch_size)
        self.patch_embedding = nn.Conv3d(
            config.in_channels, dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.condition_embedder = ConditionEmbedder(config, with_actions=worldplay)
        self.blocks = nn.ModuleList([Block(config, with_prope=worldplay) for _ in range(config.num_layers)])
        self.proj_out = nn.Linear(dim, out_features)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        if worldplay:
            self.zero_worldplay_extras()

    @torch.no_grad()
    def zero_worldplay_extras(self) -> None:
        """The official initialisation of the added modules: action ``linear_2`` and every
        ``to_out_prope`` are zeros, which makes the extended model equal the backbone."""
        act = self.condition_embedder.action_embedder
        if act is not None:
            act.linear_2.weight.zero_()
            act.linear_2.bias.zero_()
        for block in self.blocks:
            if block.attn1.to_out_prope is not None:
                block.attn1.to_out_prope[0].weight.zero_()
                block.attn1.to_out_prope[0].bias.zero_()

    # -- pieces -------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    def text_context(self, text_states: torch.Tensor) -> TextContext:
        """umT5 states ``[B, Lt, text_dim]`` -> per-block cross-attention K/V."""
        text = self.condition_embedder.text_embedder(text_states.to(self.dtype))
        return TextContext([block.attn2.text_kv(text) for block in self.blocks])

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, C, F, H, W]`` -> tokens ``[B, F*H/2*W/2, D]`` (frame-major)."""
        x = self.patch_embedding(latents.to(self.dtype))
        return x.flatten(2).transpose(1, 2).contiguous()

    def unpatchify(self, out: torch.Tensor, num_frames: int, height: int, width: int) -> torch.Tensor:
        """``[B, L, pt*ph*pw*C]`` with features ordered ``(pt, ph, pw, c)`` -> ``[B, C, F, H, W]``."""
        pt, ph, pw = self.config.patch_size
        b = out.shape[0]
        x = out.view(b, num_frames // pt, height // ph, width // pw, pt, ph, pw, -1)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, -1, num_frames, height, width)

    def modulation(
        self, timesteps: torch.Tensor, actions: torch.Tensor | None, batch: int, num_frames: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame (or per-token) ``temb [B, F, St, D]`` and ``e [B, F, St, 6, D]``."""
        t = _per_frame(timesteps, batch, num_frames, "timesteps")
        a = None if actions is None else _per_frame(actions, batch, num_frames, "actions")
        if a is not None and a.shape != t.shape:
            a = a.expand_as(t) if a.shape[-1] == 1 else a
        temb, e = self.condition_embedder(t.reshape(-1), None if a is None else a.reshape(-1), self.dtype)
        st = t.shape[-1]
        return temb.view(batch, num_frames, st, -1), e.view(batch, num_frames, st, 6, -1)

    # -- forward ------------------------------------------------------------------------

    def forward(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        text: torch.Tensor | TextContext,
        *,
        frame_positions: torch.Tensor | None = None,
        actions: torch.Tensor | None = None,
        viewmats: torch.Tensor | None = None,
        intrinsics: torch.Tensor | None = None,
        kv_buffers: KVBuffers | None = None,
        write: slice | None = None,
        read: slice | None = None,
        prefill: bool = False,
        attn_mask: torch.Tensor | None = None,
        attention_backend: str = "sdpa",
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        block_fn=None,
        fused_kernels: bool = False,
        shards: TokenShards | None = None,
    ) -> torch.Tensor | None:
        """Predict the flow-matching velocity of ``latents [B, C, F, H, W]``.

        ``timesteps``: ``[B]`` (one per sample), ``[B, F]`` / ``[F]`` (per latent frame) or
        ``[B, F*S]`` (per token). ``frame_positions [F]``: temporal RoPE positions (default
        ``0..F-1``). HY-WorldPlay inputs: ``actions`` (labels 0..80, per frame like
        ``timesteps``), ``viewmats [B, F, 4, 4]`` and ``intrinsics [B, F, 3, 3]`` (PRoPE).

        Memory: with ``kv_buffers``, each layer writes this call's keys/values to tokens
        ``write`` of its buffer and attends to tokens ``read``. ``prefill=True`` stops after the
        last block's attention (only the K/V are wanted) and returns None.

        ``rope``: precomputed tables (:meth:`rope_for`) instead of ``frame_positions`` (static
        inputs for CUDA-graph capture). ``block_fn(block, x, e, text_kv, inputs, kv)``
        replaces the plain block call (e.g. a function compiled with ``torch.compile``).
        ``fused_kernels``: :mod:`worldplay.nn.fused` (CUDA; elsewhere the same PyTorch code).
        ``shards``: this rank's tokens when the DiT runs over several ranks (every rank calls with
        the same inputs and gets the same output; see :mod:`worldplay.ranks.sequence`).
        """
        b, _, num_frames, height, width = latents.shape
        if rope is None:
            rope = self.rope_for(frame_positions, num_frames, height, width, latents.device)
        cos, sin = rope
        prope = None
        if self.worldplay and viewmats is not None:
            if intrinsics is None:
                raise ValueError("viewmats given without intrinsics")
            prope = PRoPE.from_cameras(viewmats, intrinsics, self.dtype)
        inputs = SelfAttnInputs(rope=(cos, sin), prope=prope, write=write, read=read, mask=attn_mask,
                                fused=fused_kernels, backend=attention_backend, shards=shards)
        if (kv_buffers is None) != (write is None):
            raise ValueError("kv_buffers and write/read go together")
        if shards is not None and attn_mask is not None:
            raise ValueError("attn_mask is for single-rank references; a DiT over several ranks takes none")
        ctx = text if isinstance(text, TextContext) else self.text_context(text)

        x = self.patchify(latents)
        temb, e = self.modulation(timesteps, actions, b, num_frames)
        if shards is not None:  # this rank's tokens of every frame, and their modulation
            x = shards.shard(x)
            if e.shape[2] > 1:  # per-token timesteps
                temb, e = shards.local(temb, 2), shards.local(e, 2)
        last = len(self.blocks) - 1
        for i, (block, text_kv) in enumerate(zip(self.blocks, ctx.kv, strict=True)):
            layer_kv = None if kv_buffers is None else kv_buffers.layer(i)
            if prefill and i == last:
                block.write_kv_only(x, e, inputs, layer_kv)
                return None
            if block_fn is None:
                x = block(x, e, text_kv, inputs, layer_kv)
            else:
                x = block_fn(block, x, e, text_kv, inputs, layer_kv)
        return self.head(x, temb, num_frames, height, width, shards)

    def rope_for(
        self, frame_positions: torch.Tensor | None, num_frames: int, height: int, width: int, device,
        table_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos/sin tables for frame-major tokens of a ``[.., F, height, width]`` latent,
        rounded to ``table_dtype`` (see ``round_rope_tables``)."""
        hp, wp = height // self.config.patch_size[1], width // self.config.patch_size[2]
        if frame_positions is None:
            frame_positions = torch.arange(num_frames)
        cos, sin = rope_tables(frame_positions.to(device), hp, wp, self.config.attention_head_dim)
        return round_rope_tables(cos, sin, table_dtype)

    def head(self, x: torch.Tensor, temb: torch.Tensor, num_frames: int, height: int, width: int,
             shards: TokenShards | None = None) -> torch.Tensor:
        b, per_frame = x.shape[0], x.shape[1] // num_frames
        # Official precision: the table is added to temb in the model dtype (no fp32 upcast).
        mod = self.scale_shift_table.to(temb.dtype) + temb.unsqueeze(-2)  # [B, F, St, 2, D]
        shift, scale = mod.unbind(dim=-2)
        y = _layer_norm32(x, self.config.eps).view(b, num_frames, per_frame, -1) * (1 + scale) + shift
        out = self.proj_out(y.to(x.dtype).flatten(1, 2))
        if shards is not None:  # every rank's tokens (48 x 4 values each: the smallest tensor to gather)
            out = shards.gather(out)
        return self.unpatchify(out, num_frames, height, width)


def round_rope_tables(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype | None):
    """float32 RoPE tables as a model stored in ``dtype`` holds them: the official model casts
    its tables with the rest of the model (``.to(bfloat16)``), so ``dtype=torch.bfloat16``
    matches it bit for bit; None keeps them exact."""
    if dtype is None:
        return cos, sin
    return cos.to(dtype).float(), sin.to(dtype).float()


def _per_frame(values: torch.Tensor, batch: int, num_frames: int, name: str) -> torch.Tensor:
    """Normalise timesteps/actions to ``[B, F, St]`` with St = 1 (per frame) or S (per token)."""
    v = values
    if v.ndim == 0:
        v = v.reshape(1)
    if v.ndim == 1:
        if v.numel() == batch and batch != num_frames:
            return v.view(batch, 1, 1).expand(batch, num_frames, 1)
        if v.numel() == num_frames:
            return v.view(1, num_frames, 1).expand(batch, num_frames, 1)
        if v.numel() == 1:
            return v.view(1, 1, 1).expand(batch, num_frames, 1)
        raise ValueError(f"{name}: expected {batch} or {num_frames} values, got shape {tuple(values.shape)}")
    if v.ndim == 2 and v.shape[0] == batch and v.shape[1] % num_frames == 0:
        return v.view(batch, num_frames, v.shape[1] // num_frames)
    raise ValueError(
        f"{name}: expected shape [B], [F], [B, F] or [B, F*tokens_per_frame] with B={batch}, "
        f"F={num_frames}; got {tuple(values.shape)}"
    )
