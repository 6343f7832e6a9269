"""Which graphics card runs which mode: the model card's table, from the committed memory bench.

Every number comes from one bench result (``model_card.memory`` in ``docs/site.toml``: peak
allocated and reserved, steady DiT and decode per chunk, the cap a leg ran under) and the drift
results of the modes against the fastest exact settings (``model_card.memory_drift``). A card of
``C`` GB is counted as ``C - CARD_HEADROOM_GIB`` GiB for the mode: the CUDA context, the display
and the allocator's last block need the rest (the bench's caps, 22 GiB for 24 GB cards and
14 GiB for 16 GB cards, are exactly this rule, so a leg that completed under its cap proves it).
"""

from __future__ import annotations

from typing import Any

from .load import Experiment
from .tables import markdown_table
from .text import MISSING, Markdown, code, join, md

#: Card sizes of the table's columns (GB as sold; the memory of such cards is binary GiB).
CARD_SIZES_GB = (16, 24, 32, 48, 80)
#: What a card needs beyond the mode's peak reserved memory (CUDA context, other processes).
CARD_HEADROOM_GIB = 2.0
FRAMES_PER_CHUNK = 16

# What each memory-bench leg is, for a reader choosing a mode (the leg name stays visible).
MODE_NAMES = {
    "native-fastest": "fastest (exact)",
    "native-fastest-lean": "fastest + exact memory levers",
    "native-kv-fp8": "fp8 K/V store",
    "native-lowvram-24": "--low-vram 24 (fp8 weights and K/V)",
    "native-lowvram-24-exact": "--low-vram 24-exact (bf16, DiT streamed)",
    "native-lowvram-16": "--low-vram 16 (fp8, DiT streamed)",
    "official": "official code as shipped",
}


def fits(peak_reserved_gib: float, card_gb: int) -> bool:
    """Whether a mode that reserves ``peak_reserved_gib`` runs on a card of ``card_gb``."""
    return peak_reserved_gib <= card_gb - CARD_HEADROOM_GIB


def _drift(leg: str, drifts: list[Experiment]) -> Markdown:
    if leg == "native-fastest":
        return Markdown("reference")
    if leg == "official":
        return Markdown("see parity")
    for d in drifts:
        summary = d.result.summary if d.result else {}
        if summary.get("test_leg") == leg and summary.get("reference_leg") == "native-fastest":
            comp = next(iter(summary.get("comparison", {}).values()), {})
            return md("{:.2f}/255 ({})", comp.get("mean_abs_diff", float("nan")), code(d.name))
    return Markdown("not measured")


def card_rows(bench: Experiment, drifts: list[Experiment]) -> list[dict[str, Any]]:
    """One row per leg of the memory bench, in the bench's order."""
    rows = []
    for leg, data in bench.result.summary.get("legs", {}).items():
        mem = data.get("peak_memory") or {}
        cap = (data.get("memory_plan") or {}).get("cap_gib")
        steady = data.get("steady_ms") or {}
        dit, decode = (steady.get(k, {}).get("median") for k in ("dit", "decode"))
        ok = data.get("status") == "ok"
        reserved = mem.get("peak_reserved_gib")
        row: dict[str, Any] = {
            "mode": md("{} ({})", MODE_NAMES.get(leg, leg), code(leg)),
            "cap GiB": cap,
            "peak allocated GiB": mem.get("peak_allocated_gib"),
            "peak reserved GiB": reserved,
            "DiT ms": dit if ok else None,
            "decode ms": decode if ok else None,
            "fps": FRAMES_PER_CHUNK * 1000.0 / (dit + decode) if ok and dit and decode else None,
            "drift vs fastest": _drift(leg, drifts) if ok else md("**{}**", data.get("status", "failed")),
        }
        for size in CARD_SIZES_GB:
            row[f"{size} GB"] = ("yes" if fits(reserved, size) else "no") if ok and reserved is not None else MISSING
        rows.append(row)
    return rows


def card_table(bench: Experiment, drifts: list[Experiment]) -> Markdown:
    """The table with its caption (card, run, rule), or an empty string without legs."""
    rows = card_rows(bench, drifts)
    if not rows:
        return Markdown("")
    res = bench.result
    caption = md("Which card runs which mode, measured on one {} ({} run {}; random weights; "
                 "{} frames per chunk at {}x{}). A card of C GB fits a mode whose peak reserved "
                 "memory is at most C - {:g} GiB; a leg with a cap ran under it "
                 "(torch.cuda.set_per_process_memory_fraction), which proves the card it is for.",
                 res.device_name or "device", code(bench.name), code(res.run_id), FRAMES_PER_CHUNK,
                 *bench.config.resolution, CARD_HEADROOM_GIB)
    formats = {"cap GiB": "{:g}", "peak allocated GiB": "{:.1f}", "peak reserved GiB": "{:.1f}",
               "DiT ms": "{:.0f}", "decode ms": "{:.0f}", "fps": "{:.1f}"}
    return join("\n", [Markdown(markdown_table(rows, formats=formats, caption=caption, name="card-modes"))])
