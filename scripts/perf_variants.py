"""Side-by-side timings of DiT accel modes and VAE decode variants on one GPU (perf notes).

    PYTHONPATH=. python scripts/perf_variants.py --out perf.json [--profile]

Random weights (seeded), wan5b, 704x1280, pose w-27 (7 chunks): steady chunks are 4..6 (16 memory
frames from chunk 4 on). Prints one table at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

sys.path.insert(0, ".")

from worldplay.models import random_models, random_text_states  # noqa: E402
from worldplay.pose import trajectory_from_pose_string  # noqa: E402
from worldplay.rollout import RolloutSettings, WorldPlayPipeline  # noqa: E402


def steady(rows: list[dict], key: str, first: int = 4) -> float:
    vals = [r[key] for r in rows[first:] if key in r]
    return statistics.median(vals) if vals else float("nan")


def run_variant(pipe, image, text, traj, num_chunk, **settings) -> dict:
    rows = []
    latents = []
    t0 = time.perf_counter()
    for out in pipe.rollout(image, text, traj, RolloutSettings(num_chunk=num_chunk, **settings)):
        rows.append({k: round(v, 2) for k, v in out.timings_ms.items()})
        latents.append(out.latents)
    wall = time.perf_counter() - t0
    stats = pipe.last_accel_stats.to_dict()
    steps = [sum(r[f"step{i}"] for i in range(4)) for r in rows]
    return {
        "settings": settings,
        "wall_s": round(wall, 1),
        "chunks": rows,
        "steady_prefill_ms": steady(rows, "prefill"),
        "steady_steps_ms": statistics.median(steps[4:]),
        "steady_dit_ms": steady(rows, "dit"),
        "steady_decode_ms": steady(rows, "decode"),
        "accel": stats,
        "_latents": latents,
    }


def profile_eager(pipe, image, text, traj, path: str, backend: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    gen = pipe.rollout(image, text, traj, RolloutSettings(num_chunk=6, attention_backend=backend))
    for _ in range(5):
        next(gen)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        next(gen)  # chunk 5: steady prefill + 4 steps + decode
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
    with open(path, "w") as f:
        f.write(table)
    return table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--profile", default=None)
    ap.add_argument("--variants", default="eager,graphs,compile+graphs")
    ap.add_argument("--preset", default="wan5b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="cudnn")
    args = ap.parse_args()
    dev = args.device
    h, w = (704, 1280) if args.preset == "wan5b" else (64, 96)
    models = random_models(args.preset, 0, device=dev)
    pipe = WorldPlayPipeline(models.dit, models.vae, device=dev)
    g = torch.Generator(device=dev).manual_seed(3)
    image = torch.rand(3, h, w, device=dev, generator=g) * 2 - 1
    text = random_text_states(args.preset, 0)
    traj = trajectory_from_pose_string("w-27")
    results = {"gpu": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__}
    if args.profile:
        print(profile_eager(pipe, image, text, traj, args.profile, args.backend)[:6000], flush=True)
    base = None
    for variant in args.variants.split(","):
        mode, _, extra = variant.partition("/")
        res = run_variant(pipe, image, text, traj, 7, accel=mode, attention_backend=args.backend,
                          fast_decode=extra == "fastvae")
        lat = res.pop("_latents")
        if base is None:
            base = lat
        res["latent_rel_err_vs_first"] = [
            ((a - b).norm() / b.norm()).item() for a, b in zip(lat, base, strict=True)
        ]
        results[variant] = res
        print(variant, json.dumps({k: v for k, v in res.items() if k != "chunks"}), flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print("\nmode | prefill | 4 steps | DiT | decode | replays/captures/recompiles")
    for variant in args.variants.split(","):
        r = results[variant]
        a = r["accel"]
        print(f"{variant} | {r['steady_prefill_ms']:.1f} | {r['steady_steps_ms']:.1f} | {r['steady_dit_ms']:.1f} | "
              f"{r['steady_decode_ms']:.1f} | {a['replays']}/{a['captures']}/{a['recompiles']}")


if __name__ == "__main__":
    main()
