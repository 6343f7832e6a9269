"""The Wan 2.2 VAE (TI2V-5B): a causal 3-D conv autoencoder with a streaming decoder.

Layout and numerics follow diffusers' ``AutoencoderKLWan`` for the Wan 2.2 configuration
(``is_residual=True``, ``patch_size=2``, ``z_dim=48``): the parameter names and shapes are the
same, so a diffusers ``vae/`` state dict loads with ``strict=True``. The module code is our own.

Geometry: pixels ``[B, 3, T, H, W]`` in [-1, 1] <-> latents ``[B, 48, 1 + (T-1)/4, H/16, W/16]``.
The first latent stands for exactly one frame, every later latent for four (causal in time).

Streaming. Every temporal 3x3x3 convolution is causal: it sees the current frames plus the two
frames before them. Instead of zero-padding on the left, each such conv reads its two previous
input frames from a *history buffer* and writes its last two input frames back. The buffers are
allocated once per stream (:class:`DecodeState`) and only ever updated with ``copy_``, so their
storage never moves (a prerequisite for CUDA-graph capture of the steady-state decode). A fresh
buffer holds zeros, which is exactly the causal zero padding, so no "is this the first call"
logic is needed in the ordinary convs.

Two places do depend on whether the stream has just started (``state.fresh``):

* the temporal upsamplers (``upsample3d``): the very first frame of a stream bypasses the time
  conv and is not doubled in time (diffusers marks this with the sentinel string ``"Rep"``);
* the parameter-free ``DupUp3D`` shortcuts: on the first latent they drop their leading frame.

Together these make latent 0 decode to one frame and every later latent to four, whether the
latents arrive one per call (the official HY-WorldPlay ``MyVAE``) or several per call (here).

Over several ranks (a decode state with ``columns``, :mod:`worldplay.nn.parallel`) each rank
decodes its own latent columns. The decoder is local in space but for two things, and both
go through that one object: a 3-wide spatial convolution reads one column beyond each side of
the rank's columns (``CausalConv3d.forward``: the neighbours' edge columns, or zeros at
the frame's edges, in place of the convolution's own zero padding at the split), and the
middle block's attention spans a whole frame (``MidAttention``: the keys and values of
every column). Norms are per pixel (over channels), nearest upsampling and the parameter-free
shortcuts per column: nothing else crosses a split, so the frames equal one rank's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from worldplay.config import VAEConfig

from .parallel import ColumnShards

# Frames of history a causal 3-tap time conv needs (its kernel is 3 frames deep).
HISTORY_FRAMES = 2

# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0

_LOW_PRECISION = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Patchify: the 2x2 pixel shuffle around the encoder/decoder.
# --------------------------------------------------------------------------------------------


def patchify(video: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """Fold each ``patch x patch`` pixel block into channels: ``[B,C,T,H,W] -> [B,C*p*p,T,H/p,W/p]``.

    The new channel index is ``c*p*p + pw*p + ph`` (column offset *before* row offset), the
    order the Wan 2.2 weights were trained with. Swapping ``ph``/``pw`` transposes every block
    and shows up as a 2-pixel checkerboard after decoding.
    """
    b, c, t, h, w = video.shape
    if h % patch or w % patch:
        raise ValueError(f"height {h} and width {w} must be divisible by the patch size {patch}")
    x = video.reshape(b, c, t, h // patch, patch, w // patch, patch)  # (.., ph, .., pw)
    x = x.permute(0, 1, 6, 4, 2, 3, 5)  # b, c, pw, ph, t, h', w'
    return x.reshape(b, c * patch * patch, t, h // patch, w // patch)


def unpatchify(x: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[B,C*p*p,T,h,w] -> [B,C,T,h*p,w*p]``."""
    b, cpp, t, h, w = x.shape
    c = cpp // (patch * patch)
    x = x.reshape(b, c, patch, patch, t, h, w)  # b, c, pw, ph, t, h, w
    x = x.permute(0, 1, 4, 5, 3, 6, 2)  # b, c, t, h, ph, w, pw
    return x.reshape(b, c, t, h * patch, w * patch)


# --------------------------------------------------------------------------------------------
# Streaming state.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheSlot:
    """Shape recipe for one history buffer.

    ``level`` says where in the network the conv sits: its spatial size is the reference grid
    (latent grid for the decoder, patchified input for the encoder) times ``2**level``.
    ``halo``: the conv's spatial padding; a rank of a column split keeps that many of its
    neighbours' columns on each side in the history, with its own.
    """

    channels: int
    frames: int
    level: int
    halo: int = 0

    def shape(self, batch: int, height: int, width: int,
              columns: ColumnShards | None = None) -> tuple[int, int, int, int, int]:
        w = _rescale(width, self.level) if columns is None else columns.width(self.level) + 2 * self.halo
        return (batch, self.channels, self.frames, _rescale(height, self.level), w)


def _rescale(size: int, level: int) -> int:
    if level >= 0:
        return size << level
    div = 1 << -level
    if size % div:
        raise ValueError(f"spatial size {size} is not divisible by {div}")
    return size // div


class CausalState:
    """History buffers of one encoder or decoder stream, plus the ``fresh`` flag.

    ``buffers[i]`` belongs to the conv whose ``cache_slot`` is ``i``. They are zero-filled at
    creation and by :meth:`reset`, and otherwise only written in place, so ``data_ptr()`` of
    every buffer is constant for the life of the state, unless :meth:`relayout` moves them to
    another memory format (once, when a decoder of another layout takes the state over).

    ``fresh`` is True until the first call of the stream has run. It replaces diffusers'
    per-conv ``None``/``"Rep"`` markers: all slots start together, so one flag is enough, and
    for the upsample time convs the zero-filled buffer is exactly what diffusers' second call
    uses (plain zero padding, then ``[zeros, frame]`` as the cache).
    """

    def __init__(self, buffers: list[torch.Tensor], columns: ColumnShards | None = None):
        self.buffers = buffers
        self.fresh = True
        self.columns = columns  # this rank's latent columns over several ranks (None: one rank)

    def reset(self) -> None:
        """Restart the stream without reallocating (buffer pointers stay the same)."""
        for buf in self.buffers:
            buf.zero_()
        self.fresh = True

    def relayout(self, memory_format: torch.memory_format) -> None:
        """Store the history buffers in ``memory_format`` (values kept, new storage)."""
        self.buffers = [b.contiguous(memory_format=memory_format) for b in self.buffers]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)


class DecodeState(CausalState):
    """Streaming state of the decoder for one rollout: batch size and latent grid are fixed."""

    def __init__(self, buffers: list[torch.Tensor], batch: int, latent_h: int, latent_w: int,
                 columns: ColumnShards | None = None):
        super().__init__(buffers, columns)
        self.batch = batch
        self.latent_h = latent_h
        self.latent_w = latent_w

    @property
    def first_latent_done(self) -> bool:
        """True once latent 0 (the one that decodes to a single frame) has been decoded."""
        return not self.fresh


# --------------------------------------------------------------------------------------------
# Building blocks.
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Channel RMS norm without bias: ``x / max(||x||_2, 1e-12) * sqrt(C) * gamma``.

    ``spatial_dims`` is 3 for ``[B,C,T,H,W]`` inputs and 2 for the per-frame attention input.
    The L2 norm is taken in float32 for half-precision inputs (as diffusers does), then cast
    back before the scale, to keep bf16 rounding identical to the reference.
    """

    def __init__(self, channels: int, spatial_dims: int = 3):
        super().__init__()
        self.scale = channels**0.5
        self.gamma = nn.Parameter(torch.ones(channels, *([1] * spatial_dims)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in _LOW_PRECISION:
            unit = F.normalize(x.float(), dim=1).to(x.dtype)
        else:
            unit = F.normalize(x, dim=1)
        return unit * self.scale * self.gamma


class CausalConv3d(nn.Conv3d):
    """3-D conv that is causal in time, fed by a history buffer instead of left zero-padding.

    The spatial padding is symmetric and done by the conv itself. The temporal kernel is 3 deep
    with no temporal padding: the two frames before ``x`` come from the stream's history buffer
    (zeros at the start of a stream, i.e. the usual causal zero padding), and the last two frames
    of ``[history, x]`` are written back in place for the next call.

    On a rank of a column split (``state.columns``) the width padding is the halo instead: the
    neighbouring ranks' edge columns (zeros at the frame's edges), taken before the history is
    read and written, so the history holds them too and later calls need no second exchange.
    """

    def __init__(self, in_channels: int, out_channels: int, spatial_kernel: int = 3):
        pad = spatial_kernel // 2
        super().__init__(
            in_channels, out_channels, kernel_size=(3, spatial_kernel, spatial_kernel), padding=(0, pad, pad)
        )
        self.cache_slot = -1  # assigned by the owning Encoder/Decoder

    def forward(self, x: torch.Tensor, state: CausalState) -> torch.Tensor:  # type: ignore[override]
        history = state.buffers[self.cache_slot]
        halo = self.padding[2] if state.columns is not None else 0
        if halo:
            x = state.columns.halo(x, halo)
        # The cat is a transient input to the conv; the cache storage itself never moves.
        window = torch.cat([history, x], dim=2)
        history.copy_(window[:, :, -HISTORY_FRAMES:])
        if halo:
            return F.conv3d(window, self.weight, self.bias, self.stride, (0, self.padding[1], 0))
        return super().forward(window)

    def cache_slot_spec(self, level: int) -> CacheSlot:
        """The history this conv reads at ``level``."""
        return CacheSlot(self.in_channels, HISTORY_FRAMES, level, halo=self.padding[2])


def _per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D module to every frame of ``[B,C,T,H,W]`` (frames folded into the batch)."""
    b, c, t, h, w = x.shape
    y = fn(x.transpose(1, 2).reshape(b * t, c, h, w))
    return y.view(b, t, *y.shape[1:]).transpose(1, 2)


class NearestUp2x(nn.Module):
    """2x nearest-exact spatial upsampling of ``[N,C,H,W]``.

    diffusers upcasts to float32 around ``interpolate``; for an integer 2x factor nearest-exact
    only copies pixels, so doing it in the input dtype gives identical values with half the
    transient memory.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest-exact")


class ResidualBlock(nn.Module):
    """``shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))`` with causal 3x3x3 convs."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = RMSNorm(in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.norm2 = RMSNorm(out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        # A 1x1x1 projection only where the width changes; needs no history.
        self.conv_shortcut = (
            nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor, state: CausalState) -> torch.Tensor:
        skip = self.conv_shortcut(x)
        x = self.conv1(F.silu(self.norm1(x)), state)
        x = self.conv2(F.silu(self.norm2(x)), state)
        return x + skip

    def cache_slots(self, level: int) -> list[tuple[CausalConv3d, CacheSlot]]:
        return [
            (self.conv1, self.conv1.cache_slot_spec(level)),
            (self.conv2, self.conv2.cache_slot_spec(level)),
        ]


class MidAttention(nn.Module):
    """Single-head spatial self-attention inside each frame (no mask, no positions). On a rank of
    a column split the queries are its pixels and the keys/values every pixel of the frame
    (gathered, in the frame's own pixel order, so each query sums over the same keys in the
    same order as on one rank)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = RMSNorm(channels, spatial_dims=2)
        self.to_qkv = nn.Conv2d(channels, channels * 3, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def _attend(self, frames: torch.Tensor) -> torch.Tensor:
        n, c, h, w = frames.shape
        # Token-major and contiguous, so q/k/v have unit stride along channels (what fused SDPA
        # kernels want; it also makes the CPU bf16 result match diffusers bit for bit).
        qkv = self.to_qkv(self.norm(frames)).flatten(2).transpose(1, 2).contiguous()  # [N, HW, 3C]
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)  # one head each: [N, 1, HW, C]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.squeeze(1).transpose(1, 2).reshape(n, c, h, w))

    def _attend_split(self, frames: torch.Tensor, columns: ColumnShards) -> torch.Tensor:
        n, c, h, w = frames.shape
        qkv = self.to_qkv(self.norm(frames))  # [N, 3C, h, w]: this rank's columns
        q = qkv[:, :c].flatten(2).transpose(1, 2).contiguous()  # [N, hw, C]
        # Columns are the last dim; the level is that of the latent grid (the middle block's).
        kv = columns.gather(qkv[:, c:], dim=3, level=0)  # [N, 2C, h, W]
        k, v = kv.flatten(2).transpose(1, 2).contiguous().chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1))
        return self.proj(out.squeeze(1).transpose(1, 2).reshape(n, c, h, w))

    def forward(self, x: torch.Tensor, columns: ColumnShards | None = None) -> torch.Tensor:
        if columns is not None:
            return x + _per_frame(lambda f: self._attend_split(f, columns), x)
        return x + _per_frame(self._attend, x)


class MidBlock(nn.Module):
    """Residual block, attention, residual block (both ends of the VAE)."""

    def __init__(self, channels: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(channels, channels), ResidualBlock(channels, channels)])
        self.attentions = nn.ModuleList([MidAttention(channels)])

    def forward(self, x: torch.Tensor, state: CausalState) -> torch.Tensor:
        x = self.resnets[0](x, state)
        x = self.attentions[0](x, state.columns)
        return self.resnets[1](x, state)

    def cache_slots(self, level: int) -> list[tuple[CausalConv3d, CacheSlot]]:
        return [s for r in self.resnets for s in r.cache_slots(level)]


class AvgDown3D(nn.Module):
    """Parameter-free encoder shortcut: fold ``(f_t, f_s, f_s)`` cells into channels, then average
    consecutive channel groups down to ``out_channels``. Time is first left-padded with zero frames
    to a multiple of ``f_t`` (so the lone first frame of a stream pairs with a zero frame)."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int):
        super().__init__()
        folded = in_channels * factor_t * factor_s * factor_s
        if folded % out_channels:
            raise ValueError(f"AvgDown3D: {folded} folded channels do not split into {out_channels} groups")
        self.out_channels = out_channels
        self.factor_t, self.factor_s = factor_t, factor_s
        self.group = folded // out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ft, fs = self.factor_t, self.factor_s
        if self.group == 1 and ft == 1 and fs == 1:
            return x  # folding nothing and averaging groups of one is the identity
        pad_t = -x.shape[2] % ft
        if pad_t:
            x = F.pad(x, (0, 0, 0, 0, pad_t, 0))
        b, c, t, h, w = x.shape
        x = x.reshape(b, c, t // ft, ft, h // fs, fs, w // fs, fs)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # channel order (c, dt, dh, dw)
        x = x.reshape(b, self.out_channels, self.group, t // ft, h // fs, w // fs)
        return x.mean(dim=2)


class DupUp3D(nn.Module):
    """Parameter-free decoder shortcut, the transpose of :class:`AvgDown3D`: repeat each channel,
    then unfold channel groups into ``(f_t, f_s, f_s)`` cells. At the start of a stream the first
    ``f_t - 1`` output frames are dropped, matching the main path, whose first frame is not
    doubled in time."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int):
        super().__init__()
        unfolded = out_channels * factor_t * factor_s * factor_s
        if unfolded % in_channels:
            raise ValueError(f"DupUp3D: {in_channels} channels do not tile {unfolded} unfolded channels")
        self.out_channels = out_channels
        self.factor_t, self.factor_s = factor_t, factor_s
        self.repeats = unfolded // in_channels

    def forward(self, x: torch.Tensor, stream_start: bool) -> torch.Tensor:
        ft, fs = self.factor_t, self.factor_s
        b, c, t, h, w = x.shape
        x = x.unsqueeze(2).expand(b, c, self.repeats, t, h, w)  # channel j = c*repeats + r
        x = x.reshape(b, self.out_channels, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)  # b, o, t, dt, h, dh, w, dw
        x = x.reshape(b, self.out_channels, t * ft, h * fs, w * fs)
        if stream_start and ft > 1:
            x = x[:, :, ft - 1 :]
        return x


class Downsample(nn.Module):
    """Encoder resampler: stride-2 spatial conv per frame (zero-padded right/bottom), and for the
    temporal stages a stride-2 3-tap time conv.

    Time halving is causal: the first frame of a stream passes the time conv untouched; after
    that output frame ``k >= 1`` sees input frames ``(2k-2, 2k-1, 2k)``, so a call with an even
    number of new frames needs one frame of history, the last input frame of the previous call.
    """

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(channels, channels, 3, stride=2))
        self.temporal = temporal
        if temporal:
            self.time_conv = nn.Conv3d(channels, channels, (3, 1, 1), stride=(2, 1, 1))
            self.time_conv.cache_slot = -1

    def forward(self, x: torch.Tensor, state: CausalState) -> torch.Tensor:
        x = _per_frame(self.resample, x)
        if not self.temporal:
            return x
        history = state.buffers[self.time_conv.cache_slot]  # one frame
        if state.fresh:
            # The first frame is kept as is and is itself the history of what follows.
            head = x[:, :, :1]
            out = torch.cat([head, self.time_conv(x)], dim=2) if x.shape[2] > 1 else head
        else:
            out = self.time_conv(torch.cat([history, x], dim=2))
        history.copy_(x[:, :, -1:])
        return out

    def cache_slots(self, level: int) -> list[tuple[nn.Module, CacheSlot]]:
        if not self.temporal:
            return []
        return [(self.time_conv, CacheSlot(self.time_conv.in_channels, 1, level - 1))]


class Upsample(nn.Module):
    """Decoder resampler: optional time doubling (``upsample3d``), then 2x nearest upsampling and
    a 3x3 conv per frame (``upsample2d``). The width is kept (Wan 2.2)."""

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.resample = nn.Sequential(NearestUp2x(), nn.Conv2d(channels, channels, 3, padding=1))
        self.temporal = temporal
        if temporal:
            # Causal 3-tap time conv to 2C channels; the halves become the even/odd output frames.
            self.time_conv = CausalConv3d(channels, channels * 2, spatial_kernel=1)

    def _double_time(self, x: torch.Tensor, state: CausalState) -> torch.Tensor:
        head = None
        if state.fresh:
            # diffusers' "Rep" call: the stream's first frame skips the time conv (not doubled),
            # and is *not* history for the next frames (their history stays zero).
            head, x = x[:, :, :1], x[:, :, 1:]
            if x.shape[2] == 0:
                return head
        y = self.time_conv(x, state)  # [B, 2C, T, H, W]
        b, c2, t, h, w = y.shape
        y = y.reshape(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5)  # b, c, t, half, h, w
        y = y.reshape(b, c2 // 2, 2 * t, h, w)
        return y if head is None else torch.cat([head, y], dim=2)

    def forward(self, x: torch.Tensor, state: CausalState) -> torch.Tensor:
        if self.temporal:
            x = self._double_time(x, state)
        if state.columns is None:
            return _per_frame(self.resample, x)
        # A column split: the 3x3 conv after the upsampling reads one upsampled column of each
        # neighbour (the halo) where one rank pads with zeros.
        up = state.columns.halo(_per_frame(self.resample[0], x), 1)
        conv = self.resample[1]
        return _per_frame(lambda f: F.conv2d(f, conv.weight, conv.bias, conv.stride, (conv.padding[0], 0)), up)

    def cache_slots(self, level: int) -> list[tuple[nn.Module, CacheSlot]]:
        if not self.temporal:
            return []
        return [(self.time_conv, self.time_conv.cache_slot_spec(level))]


class DownBlock(nn.Module):
    """Encoder stage: residual blocks, optional downsampler, plus the AvgDown3D shortcut."""

    def __init__(
        self, in_channels: int, out_channels: int, num_res_blocks: int, spatial: bool, temporal: bool
    ):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_res_blocks
        self.resnets = nn.ModuleList(
            ResidualBlock(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.downsampler = Downsample(out_channels, temporal) if spatial else None
        self.avg_shortcut = AvgDown3D(in_channels, out_channels, 2 if temporal else 1, 2 if spatial else 1)

    def forward(self, x: torch.Tensor, state: CausalState) -> torch.Tensor:
        skip = self.avg_shortcut(x)
        for resnet in self.resnets:
            x = resnet(x, state)
        if self.downsampler is not None:
            x = self.downsampler(x, state)
        return x + skip

    def cache_slots(self, level: int) -> list[tuple[nn.Module, CacheSlot]]:
        slots = [s for r in self.resnets for s in r.cache_slots(level)]
        if self.downsampler is not None:
            slots += self.downsampler.cache_slots(level)
        return slots


class UpBlock(nn.Module):
    """Decoder stage: ``num_res_blocks + 1`` residual blocks, optional upsampler, and (when
    upsampling) the DupUp3D shortcut from the stage input."""

    def __init__(
        self, in_channels: int, out_channels: int, num_res_blocks: int, spatial: bool, temporal: bool
    ):
        super().__init__()
        widths = [in_channels] + [out_channels] * (num_res_blocks + 1)
        self.resnets = nn.ModuleList(
            ResidualBlock(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.upsampler = Upsample(out_channels, temporal) if spatial else None
        self.dup_shortcut = DupUp3D(in_channels, out_channels, 2 if temporal else 1, 2) if spatial else None

    def forward(self, x: torch.Tensor, state: CausalState) -> torch.Tensor:
        stage_input = x
        for resnet in self.resnets:
            x = resnet(x, state)
        if self.upsampler is None:
            return x
        x = self.upsampler(x, state)
        return x + self.dup_shortcut(stage_input, stream_start=state.fresh)

    def cache_slots(self, level: int) -> list[tuple[nn.Module, CacheSlot]]:
        slots = [s for r in self.resnets for s in r.cache_slots(level)]
        if self.upsampler is not None:
            slots += self.upsampler.cache_slots(level)
        return slots


class _StreamingCoder(nn.Module):
    """Shared plumbing: number the history buffers and allocate them."""

    def _assign_cache_slots(self) -> None:
        self.slots: list[CacheSlot] = []
        for idx, (conv, slot) in enumerate(self.cache_slots()):
            conv.cache_slot = idx
            self.slots.append(slot)

    def cache_slots(self) -> list[tuple[nn.Module, CacheSlot]]:
        raise NotImplementedError

    def allocate_buffers(
        self, batch: int, height: int, width: int, device, dtype, memory_format=torch.contiguous_format,
        columns: ColumnShards | None = None,
    ) -> list[torch.Tensor]:
        """Zero-filled history buffers for a stream whose reference grid is ``height x width``
        (with ``columns``: this rank's columns of it, and their halo)."""
        return [
            torch.zeros(s.shape(batch, height, width, columns), device=device, dtype=dtype).to(
                memory_format=memory_format)
            for s in self.slots
        ]


class Encoder(_StreamingCoder):
    """Patchified video (12 channels) -> 2*z_dim channels at 1/8 of the patchified grid."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.base_dim] + [cfg.base_dim * m for m in cfg.dim_mult]
        n = len(cfg.dim_mult)
        self.conv_in = CausalConv3d(cfg.in_channels, widths[0])
        self.down_blocks = nn.ModuleList(
            DownBlock(
                widths[i],
                widths[i + 1],
                cfg.num_res_blocks,
                spatial=i != n - 1,
                temporal=i != n - 1 and cfg.temperal_downsample[i],
            )
            for i in range(n)
        )
        self.mid_block = MidBlock(widths[-1])
        self.norm_out = RMSNorm(widths[-1])
        self.conv_out = CausalConv3d(widths[-1], cfg.z_dim * 2)
        self._assign_cache_slots()

    def cache_slots(self) -> list[tuple[nn.Module, CacheSlot]]:
        slots = [(self.conv_in, self.conv_in.cache_slot_spec(0))]
        for i, block in enumerate(self.down_blocks):
            slots += block.cache_slots(-i)
        bottom = -(len(self.down_blocks) - 1)
        slots += self.mid_block.cache_slots(bottom)
        slots.append((self.conv_out, self.conv_out.cache_slot_spec(bottom)))
        return slots

    def forward(self, x: torch.Tensor, state: CausalState) -> torch.Tensor:
        x = self.conv_in(x, state)
        for block in self.down_blocks:
            x = block(x, state)
        x = self.mid_block(x, state)
        return self.conv_out(F.silu(self.norm_out(x)), state)


class Decoder(_StreamingCoder):
    """z_dim latent channels -> 12 patchified output channels at 8x the latent grid."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        base = cfg.decoder_base_dim or cfg.base_dim
        mults = [cfg.dim_mult[-1], *reversed(cfg.dim_mult)]
        widths = [base * m for m in mults]
        temporal_up = tuple(reversed(cfg.temperal_downsample))
        n = len(cfg.dim_mult)
        self.conv_in = CausalConv3d(cfg.z_dim, widths[0])
        self.mid_block = MidBlock(widths[0])
        self.up_blocks = nn.ModuleList(
            UpBlock(
                widths[i],
                widths[i + 1],
                cfg.num_res_blocks,
                spatial=i != n - 1,
                temporal=i != n - 1 and temporal_up[i],
            )
            for i in range(n)
        )
        self.norm_out = RMSNorm(widths[-1])
        self.conv_out = CausalConv3d(widths[-1], cfg.out_channels)
        self._assign_cache_slots()

    def cache_slots(self) -> list[tuple[nn.Module, CacheSlot]]:
        slots = [(self.conv_in, self.conv_in.cache_slot_spec(0))]
        slots += self.mid_block.cache_slots(0)
        for i, block in enumerate(self.up_blocks):
            slots += block.cache_slots(i)
        top = sum(block.upsampler is not None for block in self.up_blocks)
        slots.append((self.conv_out, self.conv_out.cache_slot_spec(top)))
        return slots

    @property
    def tail_start(self) -> int:
        """The first stage after the last temporal upsampling: from there on every layer is a
        causal conv with its own history, or works frame by frame."""
        temporal = [i for i, b in enumerate(self.up_blocks) if b.upsampler is not None and b.upsampler.temporal]
        return 1 + max(temporal, default=-1)

    def forward(self, x: torch.Tensor, state: CausalState, top_frames: int | None = None) -> torch.Tensor:
        """``top_frames``: run the stages from :attr:`tail_start` on (the full-resolution ones,
        where the activations are largest) on that many frames at a time. Each causal conv
        reads the frames before a slice from its history, as it does between calls, so the
        result is the same; the activations held at once shrink with the slice."""
        x = self.conv_in(x, state)
        x = self.mid_block(x, state)
        for i, block in enumerate(self.up_blocks):
            if i == self.tail_start and top_frames is not None and x.shape[2] > top_frames:
                return torch.cat([self._tail(x[:, :, t : t + top_frames], state)
                                  for t in range(0, x.shape[2], top_frames)], dim=2)
            x = block(x, state)
        return self.conv_out(F.silu(self.norm_out(x)), state)

    def _tail(self, x: torch.Tensor, state: CausalState) -> torch.Tensor:
        for block in self.up_blocks[self.tail_start :]:
            x = block(x, state)
        return self.conv_out(F.silu(self.norm_out(x)), state)


# --------------------------------------------------------------------------------------------
# The autoencoder.
# --------------------------------------------------------------------------------------------


class WanVAE(nn.Module):
    """Wan 2.2 VAE with diffusers' parameter names; inference only (``encode``/``decode`` run
    under ``no_grad``).

    Latent normalisation follows the official HY-WorldPlay code, which stores the reciprocal
    ``1/std`` (computed in float32) and multiplies on encode / divides on decode.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.patch = config.patch_size
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv3d(config.z_dim * 2, config.z_dim * 2, 1)
        self.post_quant_conv = nn.Conv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder(config)
        # Constants, not weights: kept out of the state dict and always float32 (see _apply).
        self.register_buffer("latents_mean", torch.empty(0), persistent=False)
        self.register_buffer("latents_std", torch.empty(0), persistent=False)
        self.register_buffer("latents_inv_std", torch.empty(0), persistent=False)
        self._fill_latent_stats(self.post_quant_conv.weight.device)

    # -- constants ---------------------------------------------------------------------------

    def _fill_latent_stats(self, device: torch.device) -> None:
        shape = (1, self.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.config.latents_mean, dtype=torch.float32, device=device).view(shape)
        std = torch.tensor(self.config.latents_std, dtype=torch.float32, device=device).view(shape)
        self.latents_mean = mean
        self.latents_std = std
        # HY computes 1/std in float32; IEEE division, so every device gives the same values.
        self.latents_inv_std = 1.0 / std

    def _apply(self, fn, recurse=True):
        # ``module.to(bf16)`` would round the statistics and ``to_empty`` would leave them
        # uninitialised; rebuild them in float32 from the config on whatever device they moved to.
        super()._apply(fn, recurse)
        self._fill_latent_stats(self.latents_mean.device)
        return self

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latent -> model-space latent, in float32: ``(z - mean) * (1/std)`` (as HY)."""
        return (z.float() - self.latents_mean) * self.latents_inv_std

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Model-space latent -> raw VAE latent in ``z``'s dtype: ``z / (1/std) + mean``.

        This is HY's decode-side formula, with both constants cast to ``z.dtype`` first (bf16
        in practice). In bf16 it is *not* the same as ``z * std + mean``: ``1/std`` is rounded
        to bf16 before the division.
        """
        return z / self.latents_inv_std.to(z.dtype) + self.latents_mean.to(z.dtype)

    # -- encoder -----------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B,3,T,H,W]`` in [-1,1], ``T = 1 + 4k`` -> ``(mu, logvar)``, each ``[B,z,1+k,H/16,W/16]``.

        Runs the encoder causally like diffusers: the first frame alone, then groups of four,
        with a history local to this call (the decoder's stream is never touched). The video
        is cast to the parameter dtype first (HY casts the image to the VAE dtype).
        ``logvar`` is clamped to [-30, 20] like diffusers' ``DiagonalGaussianDistribution``.
        """
        b, c, t, h, w = video.shape
        stride = self.config.scale_factor_spatial
        if (t - 1) % self.config.scale_factor_temporal:
            raise ValueError(f"encode needs 1 + 4k frames, got {t}")
        if h % stride or w % stride:
            raise ValueError(f"encode needs H and W divisible by {stride}, got {h}x{w}")
        x = patchify(video.to(self.quant_conv.weight.dtype), self.patch)
        state = CausalState(
            self.encoder.allocate_buffers(b, x.shape[3], x.shape[4], device=x.device, dtype=x.dtype)
        )
        step = self.config.scale_factor_temporal
        chunks = [(0, 1)] + [(s, s + step) for s in range(1, t, step)]  # [0:1], [1:5], [5:9], ...
        outputs = []
        for start, end in chunks:
            outputs.append(self.encoder(x[:, :, start:end], state))
            state.fresh = False
        moments = self.quant_conv(torch.cat(outputs, dim=2))
        mu, logvar = moments.chunk(2, dim=1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    @torch.no_grad()
    def encode_image(
        self,
        image: torch.Tensor,
        mode: str = "sample",
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One image ``[B,3,H,W]`` or ``[B,3,1,H,W]`` in [-1,1] -> normalised latent ``[B,z,1,H/16,W/16]``
        (float32).

        ``mode="mode"`` takes the posterior mean; ``mode="sample"`` draws
        ``mu + exp(logvar/2) * eps`` like HY-WorldPlay does for the conditioning image.
        ``eps`` has ``mu``'s shape and dtype (the parameter dtype, bf16 in HY). With
        ``generator=None`` it comes from the global RNG of ``mu``'s device; the official code
        draws it from the global CUDA RNG right after the chunk-0 noise tensor, so call this at
        that point in the RNG sequence to reproduce it. A CPU generator draws on the CPU and
        moves the result (diffusers' ``randn_tensor`` convention).
        """
        if image.dim() == 4:
            image = image.unsqueeze(2)
        if image.dim() != 5 or image.shape[2] != 1:
            raise ValueError(f"encode_image expects [B,3,H,W] or [B,3,1,H,W], got {tuple(image.shape)}")
        mu, logvar = self.encode(image)
        if mode == "mode":
            z = mu
        elif mode == "sample":
            draw_device = generator.device if generator is not None else mu.device
            eps = torch.randn(mu.shape, generator=generator, device=draw_device, dtype=mu.dtype).to(mu.device)
            z = mu + torch.exp(0.5 * logvar) * eps
        else:
            raise ValueError(f"mode must be 'sample' or 'mode', got {mode!r}")
        return self.normalize_latents(z)

    # -- decoder -----------------------------------------------------------------------------

    def new_decode_state(
        self,
        batch: int,
        latent_h: int,
        latent_w: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        memory_format: torch.memory_format = torch.contiguous_format,
        columns: ColumnShards | None = None,
    ) -> DecodeState:
        """Allocate the decoder's history buffers for one rollout (zero-filled, never reallocated),
        in ``memory_format`` (the layout of the decoder that will run: see
        :class:`worldplay.decode_runner.DecodeRunner`). ``columns``: this rank's share of a
        decode over several ranks (its history holds its columns and their halo only)."""
        ref = self.post_quant_conv.weight
        device = ref.device if device is None else torch.device(device)
        dtype = ref.dtype if dtype is None else dtype
        buffers = self.decoder.allocate_buffers(
            batch, latent_h, latent_w, device=device, dtype=dtype, memory_format=memory_format, columns=columns
        )
        return DecodeState(buffers, batch, latent_h, latent_w, columns)

    def decoded_frames(self, num_latents: int, first_latent_done: bool) -> int:
        """Frames produced by decoding ``num_latents`` latents (latent 0 of a stream gives 1)."""
        f = self.config.scale_factor_temporal
        return f * num_latents - (0 if first_latent_done else f - 1)

    def check_decode_input(self, latents: torch.Tensor, state: DecodeState) -> None:
        """Raise ValueError unless ``latents`` continue the stream ``state`` (batch, grid, device)."""
        b, _, _, h, w = latents.shape
        if (b, h, w) != (state.batch, state.latent_h, state.latent_w):
            raise ValueError(
                f"latents {tuple(latents.shape)} do not match the decode state "
                f"(batch {state.batch}, grid {state.latent_h}x{state.latent_w})"
            )
        if latents.device != state.buffers[0].device:
            raise ValueError(f"latents are on {latents.device}, the decode state is on {state.buffers[0].device}")

    @torch.no_grad()
    def decode(
        self,
        latents: torch.Tensor,
        state: DecodeState,
        *,
        network: nn.Module | None = None,
        memory_format: torch.memory_format = torch.contiguous_format,
        top_frames: int | None = None,
    ) -> torch.Tensor:
        """Decode the next ``T`` normalised latents ``[B,z,T,h,w]`` of a stream -> frames
        ``[B,3,T',16h,16w]`` in [-1, 1].

        All ``T`` latents go through the decoder in one call; this equals ``T`` calls of one
        latent. On a fresh state the first latent yields one frame (``T' = 4T - 3``), otherwise
        ``T' = 4T``. The state's buffers are updated in place.

        The latents are cast to the state's dtype *before* de-normalisation, as HY does (it casts
        to the VAE dtype, bf16, then de-normalises in bf16).

        ``network`` runs in place of ``self.decoder`` (the same function: a runner's compiled
        copy, or one whose weights are stored in ``memory_format``, the layout of the decoder's
        activations and history; see :class:`worldplay.decode_runner.DecodeRunner`).
        ``top_frames``: see ``Decoder.forward`` (the same frames, less memory at once).

        A state of a column split (``state.columns``) decodes this rank's latent columns of
        ``latents`` (every rank passes the whole latents) into its pixel columns of the frames.
        """
        self.check_decode_input(latents, state)
        if state.columns is not None:
            latents = state.columns.take(latents)
        if not state.buffers[0].is_contiguous(memory_format=memory_format):
            state.relayout(memory_format)  # a state laid out for another decoder (values kept)
        buf = state.buffers[0]
        x = self.post_quant_conv(self.denormalize_latents(latents.to(buf.dtype)))
        if memory_format != torch.contiguous_format:
            x = x.contiguous(memory_format=memory_format)
        out = (self.decoder if network is None else network)(x, state, top_frames)
        state.fresh = False
        return unpatchify(out, self.patch).clamp_(-1.0, 1.0)
