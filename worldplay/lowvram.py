"""Which settings fit which card: the exact memory levers, the low-VRAM profiles, and the
out-of-memory message that names them.

Every profile is a set of :class:`~worldplay.rollout.RolloutSettings` overrides applied on top
of the fastest settings (``worldplay.rollout.fastest_settings``); its predicted peak
comes from :mod:`worldplay.memory_plan` (``predicted_peak_gib``), its measured peak, speed and
drift from the ``bench-memory`` and ``drift-lowvram-*`` experiments.

* :data:`EXACT_LEVERS` (the ``native-fastest-lean`` leg, the fastest settings in <= 32 GiB): the
  same arithmetic as the fastest settings with less memory at once: the memory K/V's memory lent
  to the decode (dead then in reprefill mode; ``worldplay.memory.MemoryKV.lent``, CUDA graphs
  kept) and the decoder's full-resolution stages 4 frames at a time, so its transient (11.9 GiB at
  704x1280) fits inside the K/V's 12.1 (round 10 of notes/perf.md: decode within 1 % of the
  fastest).
* :data:`SMALL_DECODE` (the low-VRAM profiles and the ``native-spN`` legs): one latent per decoder
  call, the full-resolution stages one frame at a time, no channels-last copy of the decoder
  weights: the least decoder memory (4.6-5.1 GiB), 8-17 % slower decodes.
* profile ``24`` (24 GB cards, proven under a 22 GiB cap): the small decode, the DiT in host
  memory with its block linears in fp8 on the device (half the bytes), the memory K/V in fp8
  (e4m3 + per token-and-head scales), the K/V released during the decode; compiled blocks,
  no CUDA graphs (they would hold the K/V addresses). Approximate: fp8 weights and K/V.
* profile ``24-exact``: bf16 and exact; the DiT in host memory with 28 of its 30 blocks
  streamed to the device per forward (worldplay.offload), the K/V released during the decode.
  Slower: ~9 GB over PCIe per DiT forward.
* profile ``16`` (16 GB cards, under a 14 GiB cap): profile 24 with all 30 fp8 blocks streamed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# On top of the fastest settings: exact (the same arithmetic), less memory.
EXACT_LEVERS: dict[str, Any] = {"release_kv_for_decode": True, "decode_top_frames": 4}
SMALL_DECODE: dict[str, Any] = {"decode_group": 1, "decode_top_frames": 1, "decoder_copy": False}


@dataclass(frozen=True)
class LowVramProfile:
    name: str
    card_gb: int  # the card class, as sold
    cap_gib: float  # the per-process cap the bench runs it under (set_per_process_memory_fraction)
    exact: bool
    overrides: dict[str, Any]
    why: str


_NO_GRAPHS = {"accel": "compile"}  # on CUDA; the CPU keeps its eager default
PROFILES: dict[str, LowVramProfile] = {p.name: p for p in (
    LowVramProfile("24", 24, 22.0, False,
                   {**SMALL_DECODE, **_NO_GRAPHS, "dit_on_host": True, "linear_dtype": "fp8", "kv_dtype": "fp8",
                    "release_kv_for_decode": True},
                   "fp8 block linears resident (5.1 GiB instead of 9.9), fp8 memory K/V (5.4 instead of 12.1), "
                   "the K/V freed for the decode, one latent and one full-resolution frame per decoder pass"),
    LowVramProfile("24-exact", 24, 22.0, True,
                   {**SMALL_DECODE, **_NO_GRAPHS, "dit_on_host": True, "streamed_blocks": 28,
                    "release_kv_for_decode": True},
                   "exact: 28 of 30 bf16 blocks streamed from pinned host memory per forward, the K/V freed for "
                   "the decode, one latent and one full-resolution frame per decoder pass"),
    LowVramProfile("16", 16, 14.0, False,
                   {**SMALL_DECODE, **_NO_GRAPHS, "dit_on_host": True, "linear_dtype": "fp8", "kv_dtype": "fp8",
                    "streamed_blocks": 30, "release_kv_for_decode": True},
                   "profile 24 with all 30 fp8 blocks streamed from pinned host memory per forward"),
)}


def profile_settings(name: str, base: dict[str, Any], device_type: str) -> dict[str, Any]:
    """``base`` (the fastest settings' overrides for ``device_type``) with profile ``name``
    applied: the RolloutSettings overrides of that low-VRAM mode."""
    if name not in PROFILES:
        raise ValueError(f"low-VRAM profile {name!r} unknown; choose one of {sorted(PROFILES)}")
    overrides = dict(PROFILES[name].overrides)
    if device_type != "cuda":
        overrides.pop("accel")  # no compile on the CPU: the CPU legs run eagerly
    return {**base, **overrides}


def predicted_peak_gib(preset: str, height: int, width: int, settings) -> float:
    from .memory_plan import GIB, plan_memory

    return plan_memory(preset, height, width, settings).peak_bytes / GIB


def fitting_profiles(preset: str, height: int, width: int, settings, budget_gib: float,
                     base: dict[str, Any]) -> list[tuple[str, float]]:
    """The profiles whose predicted peak stays within ``budget_gib``, with those peaks, the
    largest first (the one that keeps the most on the device, so the fastest)."""
    fits = []
    for name in PROFILES:
        candidate = dataclasses.replace(settings, **profile_settings(name, base, "cuda"))
        peak = predicted_peak_gib(preset, height, width, candidate)
        if peak <= budget_gib:
            fits.append((name, peak))
    return sorted(fits, key=lambda item: -item[1])


class RunNeedsMoreMemory(RuntimeError):
    """Out of GPU memory, with what the run needs and what would fit (one line)."""


def out_of_memory_message(preset: str, height: int, width: int, settings, device, base: dict[str, Any]) -> str:
    """``this run needs about X GiB (...); <GPU> has Y GiB; --low-vram P (about Z GiB) would fit``."""
    import torch

    from .memory_plan import GIB, describe_need, plan_memory

    need = describe_need(plan_memory(preset, height, width, settings))
    total = None
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(device).total_memory / GIB
    where = f"the GPU has {total:.1f} GiB" if total is not None else "the device ran out"
    text = f"this run needs {need}; {where}"
    budget = (total or 0) - 1.0  # leave room for the CUDA context and other processes
    fits = fitting_profiles(preset, height, width, settings, budget, base) if total is not None else []
    if fits:
        options = " or ".join(f"--low-vram {name} (about {peak:.1f} GiB{', exact' if PROFILES[name].exact else ''})"
                              for name, peak in fits)
        return f"{text}; {options} would fit"
    smallest = min(PROFILES.values(), key=lambda p: p.card_gb)
    peak = predicted_peak_gib(preset, height, width,
                              dataclasses.replace(settings, **profile_settings(smallest.name, base, "cuda")))
    return (f"{text}; the smallest mode, --low-vram {smallest.name}, needs about {peak:.1f} GiB: close other GPU "
            "programs or use a smaller --height/--width")
