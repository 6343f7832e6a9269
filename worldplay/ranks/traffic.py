"""The bytes one steady chunk sends between ranks, counted by running the session's own code on
``meta`` tensors.

:class:`CountingGroup` stands in for the process group: its collectives move nothing and hand
back tensors of the right shapes, while :class:`~worldplay.ranks.group.RankGroup`'s own
accounting adds up what each would send. A steady chunk's DiT calls (the memory prefill of 16
latents, four denoising steps) and the decode of its four latents then run at the real size
through the real :class:`~worldplay.ranks.sequence.SequenceShards` and
:class:`~worldplay.ranks.columns.ColumnShards`: the count is the code's, not a formula's
(``tests/test_ranks_rollout.py`` holds it to what gloo moved in a tiny rollout).

Per rank, in bytes sent (a rank receives as much as it sends, but for the uneven splits). An
inner rank of a column split exchanges halos with two neighbours, the outer ones with one: the
default rank 1 (the largest count for N >= 3; for N = 2 both ranks count the same).
"""

from __future__ import annotations

import torch

from ..config import dit_preset, vae_preset
from ..constants import CHUNK_LATENTS, DENOISING_STEPS, MEMORY_SLOTS
from ..memory import MemoryKV
from ..nn.dit import WanDiT
from ..nn.vae import WanVAE
from .group import RankGroup

TEXT_TOKENS = 512  # umT5 prompt embeddings (wan5b)


class CountingGroup(RankGroup):
    """Rank ``rank`` of ``size`` whose collectives only count (shapes right, values none)."""

    def __init__(self, rank: int, size: int):
        super().__init__(rank, size, "meta", process_group=object())

    def _all_to_all(self, send, send_sizes, recv_sizes):
        return send.new_empty(sum(recv_sizes))

    def _all_gather(self, t):
        return [torch.empty_like(t) for _ in range(self.size)]


@torch.no_grad()
def chunk_traffic(preset: str, height: int, width: int, ranks: int, rank: int | None = None, *,
                  dit_config=None, dtype: torch.dtype = torch.bfloat16, text_tokens: int | None = None) -> dict[str, int]:
    """Bytes rank ``rank`` (default: 1, or 0 for one rank) sends in one steady chunk:
    ``dit_prefill``, ``dit_steps`` (the four steps), ``decode`` (halos, the middle attention's
    keys/values, the frames) and ``total``."""
    rank = min(1, ranks - 1) if rank is None else rank
    dcfg = dit_config or dit_preset(preset)
    meta = torch.device("meta")
    with meta:
        dit = WanDiT(dcfg, worldplay=True).to(dtype)
        vae = WanVAE(vae_preset(preset)).to(dtype)
    spatial = vae.config.scale_factor_spatial
    lh, lw = height // spatial, width // spatial
    per_frame = (lh // 2) * (lw // 2)
    group = CountingGroup(rank, ranks)
    shards = group.token_shards(per_frame, dcfg.num_attention_heads)
    kv = MemoryKV(dcfg.num_layers, 1, 2, per_frame, dcfg.num_attention_heads // ranks, dcfg.attention_head_dim,
                  device=meta, dtype=dtype)
    tokens = text_tokens or (TEXT_TOKENS if preset == "wan5b" else 16)
    text = dit.text_context(torch.zeros(1, tokens, dcfg.text_dim, device=meta, dtype=dtype))

    def call(frames: int, **where):
        cams = {"actions": torch.zeros(1, frames, device=meta), "viewmats": torch.zeros(1, frames, 4, 4, device=meta),
                "intrinsics": torch.zeros(1, frames, 3, 3, device=meta)}
        dit(torch.zeros(1, dcfg.in_channels, frames, lh, lw, device=meta, dtype=dtype),
            torch.zeros(1, frames, device=meta), text, rope=dit.rope_for(None, frames, lh, lw, meta), kv_buffers=kv,
            shards=shards, **where, **cams)

    call(MEMORY_SLOTS, write=kv.memory_tokens(MEMORY_SLOTS), read=kv.memory_tokens(MEMORY_SLOTS), prefill=True)
    prefill = group.traffic["dit"]
    for _ in range(DENOISING_STEPS):
        call(CHUNK_LATENTS, write=kv.chunk_tokens(), read=kv.attended_tokens(MEMORY_SLOTS))
    columns = group.column_shards(lw)
    state = vae.new_decode_state(1, lh, lw, device=meta, dtype=dtype, columns=columns)
    state.fresh = False  # a steady chunk: 16 frames
    video = vae.decode(torch.zeros(1, dcfg.in_channels, CHUNK_LATENTS, lh, lw, device=meta, dtype=dtype), state)
    frames = video.shape[2]
    columns.gather_frames(torch.zeros(frames, height, video.shape[-1], 3, device=meta, dtype=torch.uint8))
    out = {"dit_prefill": prefill, "dit_steps": group.traffic["dit"] - prefill, "decode": group.traffic["decode"]}
    out["total"] = sum(out.values())
    return out
