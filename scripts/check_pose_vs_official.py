"""One-off check: worldplay.pose against the official HY-WorldPlay pose functions.

    python scripts/check_pose_vs_official.py --official /path/to/HY-WorldPlay [--json FILE ...]

The official functions live in ``hyvideo/generate.py``, whose import initialises distributed
state and CUDA, so instead of importing it we pull the few function definitions we need out of
the source with ``ast`` and execute them in a namespace that provides numpy, scipy and torch.
For every pose string (and JSON file) this compares c2w, viewmats, normalised Ks and action
labels and prints the max abs difference and whether the arrays are bit-identical.
Not imported by the package or the tests. Exit status 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from scipy.spatial.transform import Rotation

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from worldplay.pose import load_trajectory_json, trajectory_from_pose_string  # noqa: E402

POSES = [
    "w-31",
    "w-3",
    "right-3",
    "w-5,right-10,s-4,a-3,d-2,up-4,down-4,left-7",
    "w-11,right-60,w-4,right-60,w-4",
    "w-19,s-20",
    "w-20, right-10, d-30, up-36",
    "up-30,right-30,w-5,d-5,down-60,left-45,s-3,a-7",
    "right-120,up-120,w-10,left-7,d-3",
]

WANTED = {
    "hyvideo/generate.py": ["mapping", "one_hot_to_one_dimension", "parse_pose_string",
                            "pose_string_to_json", "pose_to_input"],
    "hyvideo/generate_custom_trajectory.py": ["rot_x", "rot_y", "rot_z",
                                              "generate_camera_trajectory_local"],
}  # fmt: skip


def load_official(root: Path) -> dict:
    """Exec the wanted top-level definitions of the official files in a fresh namespace."""
    ns = {"np": np, "torch": torch, "json": json, "R": Rotation, "math": math}
    for rel, names in WANTED.items():
        tree = ast.parse((root / rel).read_text(), filename=str(root / rel))
        found = set()
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name in names:
                found.add(node.name)
            elif isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id in names for t in node.targets
            ):
                found.update(t.id for t in node.targets if isinstance(t, ast.Name))
            else:
                continue
            exec(compile(ast.Module(body=[node], type_ignores=[]), str(root / rel), "exec"), ns)
        missing = set(names) - found
        if missing:
            raise SystemExit(f"{rel}: definitions not found: {sorted(missing)}")
    return ns


def compare(name: str, official: dict[str, np.ndarray], ours: dict[str, np.ndarray]) -> bool:
    ok = True
    cells = []
    for key, ref in official.items():
        got = ours[key]
        same = ref.shape == got.shape and ref.dtype == got.dtype and np.array_equal(ref, got)
        diff = (
            float(np.abs(ref.astype(np.float64) - got.astype(np.float64)).max())
            if ref.shape == got.shape
            else math.inf
        )
        cells.append(f"{key} {'exact' if same else 'DIFF'} {diff:.3g} {str(ref.dtype)}{list(ref.shape)}")
        ok &= same
    print(f"{'OK ' if ok else 'BAD'} {name}: " + "; ".join(cells))
    return ok


def random_trajectory_json(path: Path, n: int, seed: int) -> None:
    """A JSON trajectory of random small rigid steps (some near the label thresholds) and random K."""
    rng = np.random.default_rng(seed)
    T = np.eye(4)
    entries = {}
    for i in range(n):
        if i:
            step = np.eye(4)
            step[:3, :3] = Rotation.from_euler("xyz", rng.choice([0.03, 0.06, 3.0], 3) * rng.choice([-1, 0, 1], 3),
                                               degrees=True).as_matrix()  # fmt: skip
            step[:3, 3] = rng.normal(size=3) * rng.choice([0.0, 5e-5, 0.08])
            T = T @ step
        cx, cy = rng.uniform(100, 1000, 2)
        K = [[rng.uniform(0.5, 2) * cx, 0, cx], [0, rng.uniform(0.5, 2) * cy, cy], [0, 0, 1]]
        entries[str(i)] = {"extrinsic": T.tolist(), "K": K}
    path.write_text(json.dumps(entries))


def write_tps_table(ns: dict, out: Path, count: int) -> int:
    """The official ``pose_to_input`` labels, first and third person, of ``count`` random
    trajectories that move and turn in the same steps (the case where the modes differ), with
    the trajectories themselves: the test data of tests/test_pose_third_person.py."""
    table = []
    with tempfile.TemporaryDirectory(prefix="pose_tps_") as tmp:
        for seed in range(count):
            path = Path(tmp) / f"random_{seed}.json"
            random_trajectory_json(path, 24, 1000 + seed)
            entries = json.loads(path.read_text())
            labels = {}
            for tps in (False, True):
                _, _, act = ns["pose_to_input"](str(path), len(entries), tps=tps)
                labels["third_person" if tps else "first_person"] = act.numpy().tolist()
            table.append({"seed": 1000 + seed, "trajectory": entries, **labels})
    differ = sum(t["first_person"] != t["third_person"] for t in table)
    out.write_text(json.dumps({"generator": "scripts/check_pose_vs_official.py --write-tps-table, official "
                                            "hyvideo/generate.py pose_to_input(tps=False/True)",
                               "cases": table}, indent=1))
    print(f"wrote {out}: {len(table)} trajectories, {differ} with labels that differ between the modes")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", type=Path, required=True, help="HY-WorldPlay checkout")
    ap.add_argument("--json", type=Path, nargs="*", default=None,
                    help="trajectory JSON files (default: the official assets/pose/*.json)")  # fmt: skip
    ap.add_argument("--random", type=int, default=20, help="also check this many random JSON trajectories")
    ap.add_argument("--write-tps-table", type=Path, metavar="JSON",
                    help="write the official labels (tps False and True) of the random trajectories to JSON "
                         "(tests/data/pose_tps_official.json) and stop")
    args = ap.parse_args()
    ns = load_official(args.official)
    if args.write_tps_table:
        return write_tps_table(ns, args.write_tps_table, args.random)
    files = (
        list(args.json) if args.json is not None else sorted((args.official / "assets/pose").glob("*.json"))
    )

    ok = True
    for pose in POSES:
        pose_json = ns["pose_string_to_json"](pose)
        w2c, ks, act = ns["pose_to_input"](pose_json, len(pose_json))
        official = {
            "c2w": np.array([p["extrinsic"] for p in pose_json.values()]),
            "viewmats": w2c.numpy(),
            "Ks": ks.numpy(),
            "actions": act.numpy(),
        }
        t = trajectory_from_pose_string(pose)
        ours = {"c2w": t.c2w, "viewmats": t.viewmats, "Ks": t.intrinsics, "actions": t.actions}
        ok &= compare(
            f"pose '{pose}' ({len(t)} latents, actions {sorted(set(t.actions.tolist()))})", official, ours
        )

    tmpdir = tempfile.TemporaryDirectory(prefix="pose_check_")
    tmp = Path(tmpdir.name)
    for seed in range(args.random):
        random_trajectory_json(tmp / f"random_{seed}.json", 64, seed)
        files.append(tmp / f"random_{seed}.json")
    for path in files:
        with open(path) as f:
            n = len(json.load(f))
        for third_person in (False, True):
            w2c, ks, act = ns["pose_to_input"](str(path), n, tps=third_person)
            t = load_trajectory_json(path, third_person=third_person)
            official = {"viewmats": w2c.numpy(), "Ks": ks.numpy(), "actions": act.numpy()}
            ours = {"viewmats": t.viewmats, "Ks": t.intrinsics, "actions": t.actions}
            mode = ", third person" if third_person else ""
            ok &= compare(
                f"json {path.name} ({n} latents, {len(set(t.actions.tolist()))} distinct actions{mode})", official, ours
            )

    tmpdir.cleanup()
    print("all exact" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
