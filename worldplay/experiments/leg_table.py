"""Every leg of every experiment, one row each: the schema (names, help, which kind may use
it), the runner (settings, dtype, ranks, memory cap) and the site (intros, GPU counts) read it.

A new mode is one row here. The module needs no torch (the schema lists legs instantly): the
settings are functions of the device type, called only by :mod:`worldplay.experiments.legs`.
The leg *names* are part of the pinned configs' hashes: rename none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..lowvram import EXACT_LEVERS, PROFILES, SMALL_DECODE, profile_settings

# How a leg runs: in this process on one device; DiT and VAE decode pipelined over two GPUs
# (worldplay.pipelined, bench only); N ranks with sequence parallelism (worldplay.ranks); the
# official code in this process; the official code at world size N (bench only).
NATIVE, PIPELINED, RANKS, OFFICIAL, OFFICIAL_RANKS = "native", "two-gpu", "ranks", "official", "official-ranks"
KINDS_OF_LEG = (NATIVE, PIPELINED, RANKS, OFFICIAL, OFFICIAL_RANKS)

Overrides = Callable[[str], dict[str, Any]]


def _fastest(device_type: str) -> dict[str, Any]:
    from ..rollout import fastest_settings  # torch: imported only when a leg is built

    return fastest_settings(device_type)


def _fastest_with(extra: dict[str, Any]) -> Overrides:
    return lambda device_type: {**_fastest(device_type), **extra}


def _fixed(overrides: dict[str, Any]) -> Overrides:
    return lambda device_type: dict(overrides)


def _sharing_one_gpu(device_type: str) -> dict[str, Any]:
    # native-spN's settings without CUDA graphs, which cannot capture host-staged exchanges
    settings = {**_fastest(device_type), **SMALL_DECODE}
    if device_type == "cuda":
        settings["accel"] = "compile"
    return settings


def _lowvram(profile: str) -> Overrides:
    return lambda device_type: profile_settings(profile, _fastest(device_type), device_type)


@dataclass(frozen=True)
class LegRow:
    name: str
    kind: str  # one of KINDS_OF_LEG
    help: str  # one line for `experiment show` and the schema's errors
    overrides: Overrides | None = None  # RolloutSettings overrides by device type (native kinds)
    dtype: str = "bfloat16"  # torch dtype name of the models
    ranks: int = 1  # processes (GPUs) the leg runs on
    memory_cap_gib: float | None = None  # CUDA allocator cap during the leg (a card size proven)
    # The one-device leg whose drift experiments measure this leg's approximation (the site
    # shows that drift beside its speed); None: the leg itself.
    mode: str | None = None
    intro: str | None = None  # site markup introducing the mode on the model card (fast modes)
    # How a ranked leg's ranks exchange tensors (worldplay.ranks.group.TRANSPORTS): "host" puts
    # them all on one GPU (gloo over host copies), a full-size check of the arithmetic.
    transport: str = "direct"

    @property
    def native(self) -> bool:
        return self.kind in (NATIVE, PIPELINED, RANKS)

    @property
    def official(self) -> bool:
        return self.kind in (OFFICIAL, OFFICIAL_RANKS)

    @property
    def drift_mode(self) -> str:
        return self.mode or self.name

    @property
    def gpus(self) -> str:
        """``one GPU``/``two GPUs``/``N GPUs``: what the site says the leg ran on."""
        if self.transport == "host":
            return f"one GPU ({self.ranks} ranks)"
        return "one GPU" if self.ranks == 1 else "two GPUs" if self.ranks == 2 else f"{self.ranks} GPUs"


_SP_HELP = ("the fastest settings over {n} ranks (one GPU each; the CPU for tiny twins): the DiT in sequence parallel "
            "(Ulysses all-to-all over heads), the VAE decode split by latent columns (worldplay.ranks)")
_REUSE_INTRO = (
    "**Reuse memory K/V** (`memory_mode=\"reuse\"`) keeps the memory keys and values of frames "
    "that stay selected (their RoPE keys re-rotated to the new rank) instead of re-prefilling all 16 memory "
    "latents every chunk, and computes only newly selected latents. It is an approximation: with depth, a "
    "frame's keys depend on the context they were computed in. Its deviation from the exact mode, from ")
_FP8_INTRO = (
    "**FP8 linears** (`linear_dtype=\"fp8\"`) run the DiT blocks' linear layers in e4m3 with "
    "per-row scales (weights per output channel, activations per token). Its deviation from the bf16 "
    "pipeline, from ")
_REUSE_FP8_INTRO = (
    "**Reuse + FP8** (`memory_mode=\"reuse\"`, `linear_dtype=\"fp8\"`), the fastest mode and the "
    "two-GPU real-time leg's settings: both approximations at once. Its deviation from the exact bf16 pipeline, "
    "from ")

ROWS: tuple[LegRow, ...] = (
    LegRow("native-eager", NATIVE, "this package, bf16, eager, the config's attention_backend", _fixed({})),
    LegRow("native-fastest", NATIVE,
           "this package with the fastest known settings (worldplay.rollout.fastest_settings)", _fastest),
    LegRow("native-float32", NATIVE, "this package, the same weights cast to float32, float32 RoPE tables",
           _fixed({"official_rope_tables": False}), dtype="float32"),
    LegRow("native-compiled", NATIVE,
           "this package, bf16, torch.compile'd DiT blocks (RolloutSettings.accel='compile')",
           _fixed({"accel": "compile"})),
    LegRow("native-reuse", NATIVE, "the fastest settings with memory_mode='reuse' (a fast approximation: memory K/V "
           "kept across chunks instead of re-prefilled)", _fastest_with({"memory_mode": "reuse"}),
           intro=_REUSE_INTRO),
    LegRow("native-fp8", NATIVE, "the fastest settings with linear_dtype='fp8' (a fast approximation: the DiT blocks' "
           "linear layers in e4m3 with per-row scales)", _fastest_with({"linear_dtype": "fp8"}),
           intro=_FP8_INTRO),
    LegRow("native-reuse-fp8", NATIVE, "the fastest settings with memory_mode='reuse' and linear_dtype='fp8'",
           _fastest_with({"memory_mode": "reuse", "linear_dtype": "fp8"}),
           intro=_REUSE_FP8_INTRO),
    LegRow("native-fastest-lean", NATIVE, "the fastest settings with the exact memory levers (worldplay.lowvram."
           "EXACT_LEVERS: the decode runs in the memory K/V's memory, dead between a chunk's last step and the "
           "next prefill, with CUDA graphs kept; the decoder's full-resolution stages 4 frames at a time), under "
           "a 32 GiB cap", _fastest_with(EXACT_LEVERS), memory_cap_gib=32.0),
    LegRow("native-kv-fp8", NATIVE, "the fastest settings with kv_dtype='fp8' (a fast approximation: the memory K/V "
           "in e4m3 with a scale per token and head)", _fastest_with({"kv_dtype": "fp8"})),
    LegRow("native-lowvram-24", NATIVE, "low-VRAM profile 24 (worldplay.lowvram: fp8 weights and memory K/V, DiT "
           "weights in host memory), under a 22 GiB cap (a 24 GB card)", _lowvram("24"),
           memory_cap_gib=PROFILES["24"].cap_gib),
    LegRow("native-lowvram-24-exact", NATIVE, "low-VRAM profile 24-exact (exact: 28 of 30 DiT blocks streamed from "
           "host memory), under a 22 GiB cap", _lowvram("24-exact"), memory_cap_gib=PROFILES["24-exact"].cap_gib),
    LegRow("native-lowvram-16", NATIVE, "low-VRAM profile 16 (fp8 weights and memory K/V, every DiT block streamed "
           "from host memory), under a 14 GiB cap (a 16 GB card)", _lowvram("16"),
           memory_cap_gib=PROFILES["16"].cap_gib),
    LegRow("native-2gpu", PIPELINED, "the fastest settings over two GPUs: DiT on GPU 0, VAE decode of the previous "
           "chunk on GPU 1 (bench only; its total is the pipelined time per chunk)", _fastest, ranks=2,
           mode="native-fastest"),
    LegRow("native-2gpu-reuse", PIPELINED, "native-2gpu with memory_mode='reuse'",
           _fastest_with({"memory_mode": "reuse"}), ranks=2, mode="native-reuse"),
    LegRow("native-2gpu-reuse-fp8", PIPELINED, "native-2gpu with memory_mode='reuse' and linear_dtype='fp8'",
           _fastest_with({"memory_mode": "reuse", "linear_dtype": "fp8"}), ranks=2,
           mode="native-reuse-fp8"),
    # With the exact memory levers: a GPU of two then peaks below the official code's 24.6 GiB at
    # two GPUs (predicted 21.8 GiB; 31.4 with the one-GPU decoder settings, whose 4-latent call
    # dominates). More counts (sp8, official-sp4) are one row each when machines that big are lent.
    *(LegRow(f"native-sp{n}", RANKS, _SP_HELP.format(n=n), _fastest_with(SMALL_DECODE), ranks=n) for n in (2, 4)),
    # Two ranks on one GPU: what native-sp2 computes, checked at full size where only one GPU is lent.
    LegRow("native-sp2-one-gpu", RANKS, "native-sp2's arithmetic with both ranks on one GPU (gloo over host copies, "
           "as NCCL refuses two ranks on one device; compiled blocks, no CUDA graphs): a full-size check of the "
           "sequence-parallel DiT and the column-split decode, not a speed figure", _sharing_one_gpu, ranks=2,
           transport="host"),
    LegRow("official", OFFICIAL, "the official HY-WorldPlay code (needs --official PATH or WORLDPLAY_OFFICIAL)"),
    LegRow("official-sp2", OFFICIAL_RANKS,
           "the official code at world size 2 (its sequence parallel and parallel VAE decode)", ranks=2),
)
LEG_TABLE: dict[str, LegRow] = {row.name: row for row in ROWS}


def names(*kinds: str) -> tuple[str, ...]:
    """The legs of these kinds, in table order."""
    return tuple(row.name for row in ROWS if row.kind in kinds)


def leg_row(name: str) -> LegRow:
    try:
        return LEG_TABLE[name]
    except KeyError:
        raise ValueError(f"{name!r} is not a leg; choose one of {list(LEG_TABLE)}") from None


def intro_of(test_leg: str | None) -> str | None:
    """The site's introduction of a fast mode, by the test leg of its drift experiment."""
    row = LEG_TABLE.get(test_leg or "")
    return row.intro if row else None


def markdown_table() -> str:
    """The legs as the Markdown table of experiments/README.md, between its ``legs-table``
    markers (tests/test_experiments.py keeps the README equal to it)."""
    lines = ["| leg | runs as | on | what it is |", "|---|---|---|---|"]
    for row in ROWS:
        cap = f"; cap {row.memory_cap_gib:g} GiB" if row.memory_cap_gib else ""
        text = row.help.replace("|", "\\|")
        lines.append(f"| `{row.name}` | {row.kind} | {row.gpus}{cap} | {text} |")
    return "\n".join(lines) + "\n"
