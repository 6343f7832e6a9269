#!/usr/bin/env python
"""One-off check: worldplay.memory_select against the official HY-WorldPlay selection code.

Loads only the needed function definitions from an official checkout (via ``ast``; importing
the packages would pull in the whole distributed/diffusers stack), runs the official
``select_mem_frames_wan`` and ours on a few pose strings, chunk by chunk, with the same point
cloud (drawn the official way right after ``torch.manual_seed(seed)``), on the CPU, and prints
per chunk the official and our indices, the chosen clip, the largest |ratio| and |score|
differences. Trajectories come from the official ``parse_pose_string`` and
``generate_camera_trajectory_local`` and are stored as fp32 like the official pose buffer.

Usage::

    python scripts/check_memory_vs_official.py --official /path/to/HY-WorldPlay

Never imported by the package or the tests.
"""

from __future__ import annotations

import argparse
import ast
import math
import sys
import time
import typing
from pathlib import Path

import numpy as np
import torch

from worldplay.memory_select import (
    fov_overlap,
    memory_point_cloud,
    select_memory,
)

TRAJECTORIES = {
    "straight w-47": "w-47",
    "out-and-back w-19,s-20": "w-19, s-20",
    "out, turn back, return w-16,right-60,w-23": "w-16, right-60, w-23",
    "in-place rotation right-47": "right-47",
    "360 turn w-11,right-60,w-4,right-60,w-4": "w-11, right-60, w-4, right-60, w-4",
    "mixed a-8,up-6,w-10,left-30,d-8,down-6,s-11": "a-8, up-6, w-10, left-30, d-8, down-6, s-11",
}


def load_functions(path: Path, names: list[str], namespace: dict) -> None:
    """Exec the top-level ``def``s called ``names`` from ``path`` into ``namespace``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in names:
            found[node.name] = node
    missing = set(names) - set(found)
    if missing:
        raise SystemExit(f"{path}: functions not found: {sorted(missing)}")
    module = ast.Module(body=[found[n] for n in names], type_ignores=[])
    exec(compile(module, str(path), "exec"), namespace)


def load_official(root: Path) -> dict:
    ns: dict = {"torch": torch, "np": np, "math": math}
    ns.update({k: getattr(typing, k) for k in ("List", "Tuple", "Dict")})
    load_functions(
        root / "hyvideo/utils/retrieval_context.py",
        [
            "generate_points_in_sphere",
            "rotation_matrix_to_angles",
            "is_inside_fov_3d_hv",
            "calculate_fov_overlap_similarity",
        ],
        ns,
    )
    load_functions(root / "wan/models/utils.py", ["select_mem_frames_wan"], ns)
    load_functions(root / "hyvideo/generate.py", ["parse_pose_string"], ns)
    load_functions(
        root / "hyvideo/generate_custom_trajectory.py",
        ["rot_x", "rot_y", "rot_z", "generate_camera_trajectory_local"],
        ns,
    )
    return ns


def official_w2c(ns: dict, pose: str) -> np.ndarray:
    """fp32 w2c poses as the official pipeline stores them (``inv`` in fp64, fp32 buffer)."""
    c2w = ns["generate_camera_trajectory_local"](ns["parse_pose_string"](pose))
    w2c = np.linalg.inv(np.array(c2w))
    return torch.from_numpy(w2c).to(torch.float32).numpy()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", required=True, type=Path, help="HY-WorldPlay checkout")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-chunks", type=int, default=0, help="0 = every chunk of the trajectory")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    ns = load_official(args.official)
    torch.manual_seed(args.seed)
    pts_official = ns["generate_points_in_sphere"](50000, 8.0)
    torch.manual_seed(args.seed)
    pts = memory_point_cloud()
    cloud_equal = torch.equal(pts, pts_official)
    print(f"point cloud (seed {args.seed}): identical to official = {cloud_equal}")

    # Ratio-level check on random pose pairs (incl. arbitrary rotations).
    g = np.random.default_rng(args.seed)
    worst = 0.0
    for _ in range(40):
        mats = []
        for _ in range(2):
            a = g.normal(size=3)
            rot = torch.linalg.matrix_exp(
                torch.tensor([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]]) * 0.6
            ).numpy()
            c2w = np.eye(4)
            c2w[:3, :3] = rot
            c2w[:3, 3] = g.normal(size=3) * 1.5
            mats.append(np.linalg.inv(c2w).astype(np.float32))
        ref = ns["calculate_fov_overlap_similarity"](
            mats[0], mats[1], fov_h_deg=60.0, fov_v_deg=35.0, device="cpu", points_local=pts_official
        )
        ours = fov_overlap(torch.from_numpy(mats[0])[None], torch.from_numpy(mats[1])[None], pts)
        worst = max(worst, abs(ref - float(ours[0, 0])))
    print(f"random pose pairs: max |ov official - ov ours| = {worst:.3g} (40 pairs)")

    total_mismatch = 0
    overall_score = 0.0
    for name, pose in TRAJECTORIES.items():
        w2c = official_w2c(ns, pose)
        n_latent = w2c.shape[0]
        print(f"\n== {name}: pose '{pose}', {n_latent} latents")
        print(
            "  cur | official clip | ours clip | indices equal | max|score diff| | max|ov diff| | t_off  t_ours"
        )
        n_chunks = n_latent // 4
        if args.max_chunks:
            n_chunks = min(n_chunks, args.max_chunks)
        for chunk in range(4, n_chunks):
            cur = 4 * chunk
            # Official: pose buffer of length n_latent, frames >= cur+4 still zero.
            buf = np.zeros_like(w2c)
            buf[: cur + 4] = w2c[: cur + 4]
            t0 = time.perf_counter()
            off = ns["select_mem_frames_wan"](
                buf, cur, memory_frames=16, temporal_context_size=12, pred_latent_size=4,
                points_local=pts_official, device="cpu",
            )  # fmt: skip
            t1 = time.perf_counter()
            sel = select_memory(w2c[: cur + 4], cur, pts)
            t2 = time.perf_counter()

            # Official per-candidate scores and ratios (same code path, recomputed here).
            calc = ns["calculate_fov_overlap_similarity"]
            off_scores, ov_diff = [], 0.0
            hist = sorted({h for s in sel.candidate_starts for h in (s, s + 2)})
            ours_ov = fov_overlap(torch.from_numpy(w2c[cur : cur + 4]), torch.from_numpy(w2c[hist]), pts)
            ov_off = {}
            for qi, q in enumerate(range(cur, cur + 4)):
                for hi, h in enumerate(hist):
                    v = calc(
                        buf[q],
                        buf[h],
                        fov_h_deg=60.0,
                        fov_v_deg=35.0,
                        device="cpu",
                        points_local=pts_official,
                    )
                    ov_off[q, h] = v
                    ov_diff = max(ov_diff, abs(v - float(ours_ov[qi, hi])))
            for s in sel.candidate_starts:
                tot = 0
                for q in range(cur, cur + 4):
                    tot += ((1.0 - ov_off[q, s]) + (1.0 - ov_off[q, s + 2])) / 2.0
                off_scores.append(tot / 4)
            score_diff = max(abs(a - b) for a, b in zip(off_scores, sel.candidate_scores, strict=True))
            off_clip = [i for i in off if i < cur - 12]
            equal = off == sel.indices
            total_mismatch += not equal
            overall_score = max(overall_score, score_diff)
            print(
                f"  {cur:3d} | {off_clip[0]:13d} | {sel.chosen_start:9d} | {str(equal):13s} |"
                f" {score_diff:15.3g} | {ov_diff:11.3g} | {1e3 * (t1 - t0):5.0f}ms {1e3 * (t2 - t1):4.0f}ms"
            )
            if not equal:
                print(f"      official {off}\n      ours     {sel.indices}")

    print(
        f"\nSUMMARY: cloud identical={cloud_equal}, random-pair max|ov diff|={worst:.3g}, "
        f"chunks with differing indices={total_mismatch}, max|score diff|={overall_score:.3g}"
    )
    return 0 if (cloud_equal and total_mismatch == 0) else 1


if __name__ == "__main__":
    sys.exit(main())
