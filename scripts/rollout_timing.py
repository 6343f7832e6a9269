"""Smoke + per-chunk timings of a full-size rollout with random weights (GPU).

    PYTHONPATH=. python scripts/rollout_timing.py --num-chunk 8 --pose w-31
Random weights: the frames are not pictures; the timings are real.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

sys.path.insert(0, ".")

from worldplay.checkpoint import build_on_device, random_init_  # noqa: E402
from worldplay.config import DIT_PRESETS, VAE_PRESETS  # noqa: E402
from worldplay.nn.dit import WanDiT  # noqa: E402
from worldplay.nn.vae import WanVAE  # noqa: E402
from worldplay.pose import trajectory_from_pose_string  # noqa: E402
from worldplay.rollout import RolloutSettings, WorldPlayPipeline  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-chunk", type=int, default=8)
    ap.add_argument("--pose", default="w-31")
    ap.add_argument("--backend", default="sdpa")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = "cuda"
    dit = build_on_device(lambda: WanDiT(DIT_PRESETS["wan5b"], worldplay=True), dev, torch.bfloat16).eval()
    random_init_(dit, 0)
    vae = build_on_device(lambda: WanVAE(VAE_PRESETS["wan5b"]), dev, torch.bfloat16).eval()
    random_init_(vae, 0)
    pipe = WorldPlayPipeline(dit, vae, device=dev)
    g = torch.Generator(device=dev).manual_seed(3)
    image = torch.rand(3, 704, 1280, device=dev, generator=g) * 2 - 1
    text = torch.randn(1, 512, 4096, device=dev, generator=g)
    rows = []
    torch.cuda.reset_peak_memory_stats()
    for out in pipe.rollout(image, text, trajectory_from_pose_string(args.pose),
                            RolloutSettings(num_chunk=args.num_chunk, attention_backend=args.backend)):
        row = {"chunk": out.index, "frames": out.frames.shape[0],
               "memory": out.memory.indices if out.memory else [],
               **{k: round(v, 1) for k, v in out.timings_ms.items()},
               "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
