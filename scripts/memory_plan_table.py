"""The memory plan of the bench-memory legs at wan5b 704x1280 (worldplay.memory_plan), as the
Markdown tables of notes/perf.md and a JSON file for the site's "which card runs which mode" table.

    PYTHONPATH=. python scripts/memory_plan_table.py [--json notes/memory/plans-wan5b-704x1280.json]

No GPU needed: residents are counted from meta objects, transients traced on fake tensors.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LEGS = ("native-fastest", "native-fastest-lean", "native-lowvram-24", "native-lowvram-24-exact", "native-lowvram-16")
CARDS_GB = (16, 24, 32, 48, 80)


def main() -> int:
    from worldplay.experiments.legs import native_leg
    from worldplay.memory_plan import GIB, plan_memory
    from worldplay.rollout import RolloutSettings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the plans here")
    args = ap.parse_args()
    plans, names = {}, {}
    for name in LEGS:
        leg = native_leg(name, "cuda")
        settings = RolloutSettings(num_chunk=8, **leg.overrides)
        plan = plan_memory("wan5b", 704, 1280, settings)
        plans[name] = {**plan.to_dict(), "cap_gib": leg.memory_cap_gib, "overrides": leg.overrides}
        names[name] = plan
        print(f"\n#### {name} (cap {leg.memory_cap_gib} GiB)\n")
        print(plan.markdown())
    # One row per item, one column per leg (the counted table of the notes).
    items = []
    for plan in names.values():
        for item in plan.items:
            if item.name not in items:
                items.append(item.name)
    print("\n| item (GiB) | " + " | ".join(LEGS) + " |")
    print("|---|" + "---|" * len(LEGS))
    for item in items:
        cells = []
        for plan in names.values():
            found = [i for i in plan.items if i.name == item]
            cells.append(f"{found[0].gib:.2f}" if found else "")
        print(f"| {item} | " + " | ".join(cells) + " |")
    for label, key in (("predicted peak allocated", "peak_bytes"), ("reserved, upper bound", "reserved_upper_bytes")):
        print(f"| **{label}** | " + " | ".join(f"**{getattr(p, key) / GIB:.2f}**" for p in names.values()) + " |")
    print("\n| mode | predicted peak (GiB) | " + " | ".join(f"{c} GB" for c in CARDS_GB) + " |")
    print("|---|---|" + "---|" * len(CARDS_GB))
    for name, plan in names.items():
        peak = plan.peak_bytes / GIB
        # A card of C GB offers ~C GiB less the CUDA context (~0.5-1 GiB): the caps leave 2 GiB.
        fits = ["fits" if peak <= c - 2 else "-" for c in CARDS_GB]
        print(f"| {name} | {peak:.1f} | " + " | ".join(fits) + " |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"preset": "wan5b", "resolution": [704, 1280], "num_chunk": 8,
                                         "source": "worldplay.memory_plan (predicted, not measured)",
                                         "legs": plans}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
