"""The fastest settings' CUDA-graph and compile counters: captures, replays, steady recompiles.

A short device check that a refactoring of the runners kept the accelerated path intact: the
fastest settings (``worldplay.rollout.fastest_settings``) must capture the steady prefill and
step graphs once each (2 captures) and never recompile in the steady state. Seeded random
weights (the counters do not depend on the weights); the tiny preset by default, because the
compiled graphs and their captures are the same code at any size and the tiny one compiles in
seconds.

    python scripts/accel_check.py --preset tiny --num-chunk 8 --out "$OUT/accel.json"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's worldplay, not an installed one


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=("tiny", "wan5b"))
    ap.add_argument("--num-chunk", type=int, default=8)
    ap.add_argument("--attention", default=None,
                    help="attention backend instead of the fastest one (cuDNN refuses the tiny preset's head dim 12)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("accel_check: needs a CUDA GPU (the counters are of CUDA graphs)", file=sys.stderr)
        return 2

    from worldplay.constants import PRESET_RESOLUTION
    from worldplay.models import random_models, random_text_states
    from worldplay.pose import trajectory_from_pose_string
    from worldplay.rollout import RolloutSettings, WorldPlayPipeline, fastest_settings

    device = torch.device("cuda")
    height, width = PRESET_RESOLUTION[args.preset]
    models = random_models(args.preset, 0, device=device)
    pipe = WorldPlayPipeline(models.dit, models.vae, device=device, dtype=torch.bfloat16)
    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(2)) * 2 - 1
    trajectory = trajectory_from_pose_string(f"w-{4 * args.num_chunk - 1}")
    overrides = fastest_settings("cuda")
    if args.attention:
        overrides["attention_backend"] = args.attention
    settings = RolloutSettings(num_chunk=args.num_chunk, seed=0, **overrides)
    torch.cuda.reset_peak_memory_stats(device)
    chunks = []
    t0 = time.perf_counter()
    for out in pipe.rollout(image, random_text_states(args.preset, 0), trajectory, settings):
        chunks.append({"chunk": out.index, "ms": {k: round(v, 2) for k, v in out.timings_ms.items()},
                       "retrieved_clip": out.memory.chosen_start if out.memory else None})
    report = {
        "preset": args.preset, "num_chunk": args.num_chunk, "device_name": torch.cuda.get_device_name(device),
        "torch": torch.__version__, "settings": dataclasses.asdict(settings),
        "accel": pipe.last_accel_stats.to_dict(), "wall_s": round(time.perf_counter() - t0, 2),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 3), "chunks": chunks,
        "weights": "seeded random (seed 0)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("device_name", "accel", "wall_s", "peak_allocated_gib")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
