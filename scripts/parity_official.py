"""Parity of the native pipeline with the official code, same weights, on one GPU.

    PYTHONPATH=/tmp/offsite:. python scripts/parity_official.py --official .official/official \\
        --image .official/official/assets/img/1.png --pose w-19,s-12 --num-chunk 8 \\
        --work /tmp/parity --out parity.json

1. One set of seeded random wan5b weights is written in the published on-disk layouts
   (``wan_transformer/config.json``, ``wan_distilled_model/model.pt``, ``vae/``).
2. Native legs (this process, which never imports the official code): the weights are read back
   through ``worldplay.checkpoint`` and rolled out with flash attention (the kernel the official
   code ends up using, since it switches cuDNN attention off) and with cuDNN attention.
3. Official legs (subprocesses under torchrun, ``scripts/official_rollout.py``): as shipped
   numerics with its compiles off (parity needs no speed), SDPA default (flash) and, as the
   official-vs-official floor, SDPA restricted to the memory-efficient kernel.
4. Per chunk: latent relative error and mean |diff| of the uint8 frames (before any video
   encoding), for native vs official and for the floors.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, ".")

from worldplay.checkpoint import load_dit, load_vae  # noqa: E402
from worldplay.config import DIT_PRESETS, VAE_PRESETS  # noqa: E402
from worldplay.media import load_image  # noqa: E402
from worldplay.models import random_models, random_text_states  # noqa: E402
from worldplay.official import export_weights  # noqa: E402
from worldplay.pose import load_trajectory  # noqa: E402
from worldplay.rollout import RolloutSettings, WorldPlayPipeline  # noqa: E402


def export(work: Path) -> Path:
    weights = work / "weights"
    if (weights / "wan_distilled_model" / "model.pt").is_file():
        return weights
    models = random_models("wan5b", 0, device="cuda", dtype=torch.bfloat16)
    export_weights(models.dit.state_dict(), DIT_PRESETS["wan5b"].to_dict(), models.vae,
                   VAE_PRESETS["wan5b"].to_dict(), weights)
    del models
    torch.cuda.empty_cache()
    return weights


def native(weights: Path, args, backends: list[str]) -> dict[str, list[dict]]:
    dit, dit_id = load_dit(weights / "wan_transformer", worldplay_weights=weights / "wan_distilled_model" / "model.pt",
                           device="cuda", dtype=torch.bfloat16)
    vae, _ = load_vae(weights / "vae", device="cuda", dtype=torch.bfloat16)
    pipe = WorldPlayPipeline(dit, vae, device="cuda")
    image = load_image(args.image, 1280, 704)
    text = random_text_states("wan5b", 0)
    traj = load_trajectory(args.pose)
    legs = {}
    for backend in backends:
        rows = []
        for out in pipe.rollout(image, text, traj, RolloutSettings(num_chunk=args.num_chunk, seed=0,
                                                                   attention_backend=backend)):
            rows.append({"latents": out.latents, "frames": out.frames.numpy(),
                         "memory": out.memory.indices if out.memory else [],
                         "timings": out.timings_ms})
        legs[f"native-{backend}"] = rows
    del pipe, dit, vae
    torch.cuda.empty_cache()
    return legs


def official(weights: Path, args, work: Path, sdpa: str) -> list[dict]:
    out = work / f"official-{sdpa}"
    if (out / "stats.json").is_file():  # resumable: reuse a finished official run
        return _read_official(out)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "scripts/official_rollout.py",
           "--official", str(args.official), "--weights", str(weights), "--image", str(args.image),
           "--pose", args.pose, "--num-chunk", str(args.num_chunk), "--random-text", "0", "--no-compile",
           "--sdpa-backend", sdpa, "--out", str(out)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    print(f"official ({sdpa}) exit {done.returncode} in {time.perf_counter() - t0:.0f} s", flush=True)
    if done.returncode:
        print(done.stdout[-4000:], done.stderr[-8000:], sep="\n")
        raise SystemExit(f"official leg ({sdpa}) failed")
    return _read_official(out)


def _read_official(out: Path) -> list[dict]:
    stats = json.loads((out / "stats.json").read_text())
    rows = []
    for i, chunk in enumerate(stats["chunks"]):
        stem = out / f"chunk_{i:03d}"
        rows.append({"latents": load_file(str(stem) + "_latents.safetensors")["latents"],
                     "frames": np.load(str(stem) + "_frames.npy"),
                     "memory": chunk.get("memory_indices", []), "timings": chunk.get("timings_ms", {})})
    return rows


def compare(a: list[dict], b: list[dict]) -> list[dict]:
    rows = []
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        la, lb = x["latents"].double(), y["latents"].double()
        fa, fb = x["frames"].astype(np.int16), y["frames"].astype(np.int16)
        diff = np.abs(fa - fb)
        rows.append({
            "chunk": i,
            "latent_rel_err": ((la - lb).norm() / lb.norm()).item(),
            "mean_abs_uint8": float(diff.mean()),
            "max_abs_uint8": int(diff.max()),
            "frames": int(fa.shape[0]),
            "same_memory": list(x["memory"] or []) == list(y["memory"] or []),
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--official", type=Path, required=True)
    ap.add_argument("--image", type=Path, required=True)
    ap.add_argument("--pose", default="w-19,s-12")
    ap.add_argument("--num-chunk", type=int, default=8)
    ap.add_argument("--work", type=Path, default=Path("/tmp/parity"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    weights = export(args.work)
    legs = native(weights, args, ["flash", "cudnn"])
    legs["official-flash"] = official(weights, args, args.work, "default")
    legs["official-efficient"] = official(weights, args, args.work, "efficient")
    report = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "weights": "random-init:0 (wan5b, bf16), exported to the published layouts and loaded by both legs",
        "pose": args.pose,
        "num_chunk": args.num_chunk,
        "image": str(args.image),
        "memory": {name: [r["memory"] for r in rows] for name, rows in legs.items()},
        "native_flash_vs_official_flash": compare(legs["native-flash"], legs["official-flash"]),
        "floor_official_efficient_vs_official_flash": compare(legs["official-efficient"], legs["official-flash"]),
        "floor_native_cudnn_vs_native_flash": compare(legs["native-cudnn"], legs["native-flash"]),
        "native_cudnn_vs_official_flash": compare(legs["native-cudnn"], legs["official-flash"]),
        "timings": {name: [r["timings"] for r in rows] for name, rows in legs.items()},
    }
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print("\nchunk | native-vs-official rel / |d| | floor official rel / |d| | floor native rel / |d| | memory")
    for a, b, c in zip(report["native_flash_vs_official_flash"], report["floor_official_efficient_vs_official_flash"],
                       report["floor_native_cudnn_vs_native_flash"], strict=True):
        print(f"{a['chunk']} | {a['latent_rel_err']:.4f} / {a['mean_abs_uint8']:.2f} | "
              f"{b['latent_rel_err']:.4f} / {b['mean_abs_uint8']:.2f} | "
              f"{c['latent_rel_err']:.4f} / {c['mean_abs_uint8']:.2f} | {a['same_memory']}")
    print("memory (native):", report["memory"]["native-flash"])
    print("memory (official):", report["memory"]["official-flash"])


if __name__ == "__main__":
    main()
