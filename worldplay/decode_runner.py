"""Running the streaming VAE decode with speed options, without touching the VAE.

The VAE (:class:`worldplay.nn.vae.WanVAE`) stays as loaded: weights and math. A
:class:`DecodeRunner` owns everything a faster decode needs:

* ``channels_last``: activations and decode-state history buffers in NDHWC (cuDNN's
  implicit-GEMM convolutions use that layout natively, no transposes;
  :meth:`DecodeRunner.new_decode_state` allocates the history in it), so the layout of the
  activations and the history always agree, whatever ran before. With ``copy_weights`` (the
  default) the runner holds its own copy of the decoder with NDHWC conv weights (1.03 GiB for
  wan5b); without, the convolutions read the VAE's own contiguous weights and cuDNN re-lays
  each one out per call (~1 GB of extra traffic per decoder call, no second copy resident);
* ``compile``: that decoder through ``torch.compile`` once a stream is past its first latent
  (the fresh first call has other shapes and runs eagerly), fusing the RMS norms, SiLUs and
  residual adds around the convolutions;
* ``graphs`` (CUDA): a stream's first steady call captured as a CUDA graph and replayed for the
  later ones (the history buffers never move, so one graph serves the whole stream);
* ``group``: latents per decoder call (``RolloutSettings.decode_group``). A chunk's 4 latents in
  one call need activations for 16 frames at once (at 704x1280 the eager decoder peaks at
  ~18.9 GiB over its weights and state, by ``worldplay.memory_plan``); in calls of 1 latent,
  a quarter. The causal convolutions read their history from the state either way, so the
  frames are the same (bit for bit in bf16 on the CPU; elsewhere up to the convolution
  algorithm a backend picks for another frame count);
* ``top_frames``: inside a call, the stages after the last temporal upsampling (full
  resolution, 256-512 channels at 8x the latent grid) on that many frames at a time
  (``worldplay.nn.vae.Decoder.forward``), the same frames by the same argument; with one
  latent per call and one frame at a time the eager decoder's transient at 704x1280 is
  ~1.7 GiB instead of ~18.9.

Every option computes the same function; ``compile`` may change the rounding of the fused
elementwise work. Over several ranks (a decode state with ``columns``) each rank decodes its
band of columns with the same options; the halo exchanges between its convolutions stay eager
(graph breaks of the compiled decoder, :mod:`worldplay.ranks.columns`). A runner is chosen by the settings (``RolloutSettings.fast_decode``), so the
order in which rollouts with different settings run never matters.
"""

from __future__ import annotations

import copy
import dataclasses
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn

from .graphs import CapturedCall
from .nn.parallel import ColumnShards
from .nn.vae import DecodeState, WanVAE

DECODE_GROUPS = (1, 2, 4)  # latents per decoder call: divisors of a chunk's 4


@dataclass(frozen=True)
class DecodeOptions:
    compile: bool = False
    channels_last: bool = False
    graphs: bool = False
    copy_weights: bool = True  # with channels_last: the runner's own NDHWC copy of the decoder
    group: int = 4
    top_frames: int | None = None  # the full-resolution stages on this many frames at a time

    def __post_init__(self) -> None:
        if self.group not in DECODE_GROUPS:
            raise ValueError(f"decode group {self.group} unknown; choose one of {DECODE_GROUPS} latents per call")
        if self.top_frames is not None and self.top_frames < 1:
            raise ValueError(f"top_frames must be None or >= 1, got {self.top_frames}")

    @classmethod
    def for_fast_decode(cls, fast_decode: bool) -> DecodeOptions:
        """``RolloutSettings.fast_decode``: the channels-last compiled decoder (no graphs)."""
        return cls(compile=True, channels_last=True) if fast_decode else cls()

    @classmethod
    def for_settings(cls, settings) -> DecodeOptions:
        """The decoder a :class:`~worldplay.rollout.RolloutSettings` chooses: ``fast_decode``
        (channels-last, compiled), ``decoder_copy``, ``decode_group`` and ``decode_top_frames``."""
        fast = cls.for_fast_decode(settings.fast_decode)
        return dataclasses.replace(fast, copy_weights=settings.decoder_copy, group=settings.decode_group,
                                   top_frames=settings.decode_top_frames or None)


def _graphs_possible(buffer: torch.Tensor) -> bool:
    return buffer.is_cuda


def _relaid_out(decoder: nn.Module, memory_format: torch.memory_format) -> nn.Module:
    """A copy of ``decoder`` whose conv weights are stored in ``memory_format`` (the original
    keeps its own)."""
    clone = copy.deepcopy(decoder)
    for module in clone.modules():
        if isinstance(module, nn.Conv3d):
            module.to(memory_format=memory_format)
    return clone


class DecodeRunner:
    """Streaming decodes of ``vae`` with ``options``; ``vae`` is never changed."""

    def __init__(self, vae: WanVAE, options: DecodeOptions = DecodeOptions()):
        self.vae = vae
        self.options = options
        self.layout = torch.channels_last_3d if options.channels_last else torch.contiguous_format
        own_copy = options.channels_last and options.copy_weights
        self.decoder = _relaid_out(vae.decoder, self.layout) if own_copy else vae.decoder
        self._compiled = torch.compile(self.decoder, dynamic=False) if options.compile else None
        # One graph per decode state (and input shape), dropped with the state.
        self._graphs: weakref.WeakKeyDictionary[DecodeState, tuple[tuple, CapturedCall]] = weakref.WeakKeyDictionary()

    def new_decode_state(self, batch: int, latent_h: int, latent_w: int, device=None, dtype=None,
                         columns: ColumnShards | None = None) -> DecodeState:
        """A fresh stream's decoder history, in this runner's layout; ``columns``: this rank's
        share of a decode over several ranks (:mod:`worldplay.ranks.columns`)."""
        return self.vae.new_decode_state(batch, latent_h, latent_w, device=device, dtype=dtype,
                                         memory_format=self.layout, columns=columns)

    @property
    def weight_copy_nbytes(self) -> int:
        """Bytes of the runner's own decoder copy (0 when it runs the VAE's decoder)."""
        if self.decoder is self.vae.decoder:
            return 0
        return sum(t.numel() * t.element_size() for t in [*self.decoder.parameters(), *self.decoder.buffers()])

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """:meth:`worldplay.nn.vae.WanVAE.decode` with this runner's options: the next normalised latents of the
        stream ``state`` -> frames in [-1, 1], in calls of ``options.group`` latents."""
        self.vae.check_decode_input(latents, state)
        group = self.options.group
        if latents.shape[2] > group:
            return torch.cat([self._decode_group(latents[:, :, i : i + group], state)
                              for i in range(0, latents.shape[2], group)], dim=2)
        return self._decode_group(latents, state)

    def _decode_group(self, latents: torch.Tensor, state: DecodeState) -> torch.Tensor:
        if not state.buffers[0].is_contiguous(memory_format=self.layout):
            # A state from elsewhere (another runner, or WanVAE.new_decode_state). In the other
            # layout every causal conv's [history, x] window needs a transposing copy: at
            # 704x1280 on an H100 that cost 442 ms per chunk against 411 ms. Re-lay the history
            # out once instead (its values are kept, mid-stream too).
            state.relayout(self.layout)
        if self.options.graphs and not state.fresh and _graphs_possible(state.buffers[0]):
            # A graph belongs to one state (whose buffers it writes in place) and one input shape.
            key = (tuple(latents.shape), state.buffers[0].data_ptr())
            entry = self._graphs.get(state)
            if entry is None or entry[0] != key:
                entry = (key, self._capture(latents, state))
                self._graphs[state] = entry
            # The static output is overwritten by the next replay: hand out a copy.
            return entry[1](latents=latents).clone()
        return self._decode_call(latents, state)

    def _decode_call(self, latents: torch.Tensor, state: DecodeState) -> torch.Tensor:
        network = self._compiled if (self._compiled is not None and not state.fresh) else self.decoder
        return self.vae.decode(latents, state, network=network, memory_format=self.layout,
                               top_frames=self.options.top_frames)

    def _capture(self, latents: torch.Tensor, state: DecodeState) -> CapturedCall:
        """A stream's steady call as a CUDA graph. The call updates the history buffers in
        place, so the warm-up call would advance the stream: they are saved before it and
        restored after."""
        static = {"latents": latents.clone()}
        saved = [b.clone() for b in state.buffers]

        def restore() -> None:
            for b, s in zip(state.buffers, saved, strict=True):
                b.copy_(s)

        return CapturedCall(lambda: self._decode_call(static["latents"], state), static, warmups=1, restore=restore)
