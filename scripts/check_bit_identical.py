"""Tiny CPU rollouts of every leg that runs on a CPU, as sha256 digests per chunk.

A refactoring that claims "numbers do not move" runs this before (``--write``, digests from the
original code into ``tests/data/bit_identical.json``) and after (the default: check against that
file). Each case builds fresh models (seeded random init), so a case's digests do not depend on
which cases ran before it; the trajectory walks far enough (8 chunks) for the memory to fill its
16 slots and for retrieval to choose a clip. The digests hold for one machine and torch build
(CPU kernels differ between them): record and check on the same one.

    python scripts/check_bit_identical.py --write          # record (original code)
    python scripts/check_bit_identical.py                  # check every case
    python scripts/check_bit_identical.py --cases default,reuse
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's worldplay, not an installed one
DIGESTS = ROOT / "tests" / "data" / "bit_identical.json"
POSE = "w-31"
NUM_CHUNK = 8

# name -> (model dtype, RolloutSettings overrides)
CASES: dict[str, tuple[torch.dtype, dict]] = {
    "default": (torch.bfloat16, {}),
    "reuse": (torch.bfloat16, {"memory_mode": "reuse"}),
    "fp8": (torch.bfloat16, {"linear_dtype": "fp8"}),
    "reuse-fp8": (torch.bfloat16, {"memory_mode": "reuse", "linear_dtype": "fp8"}),
    "fused": (torch.bfloat16, {"fused_kernels": True}),
    "float32": (torch.float32, {"official_rope_tables": False}),
    "compile": (torch.bfloat16, {"accel": "compile"}),
    "compile-fused-reuse": (torch.bfloat16, {"accel": "compile", "fused_kernels": True, "memory_mode": "reuse"}),
    "compile-fp8": (torch.bfloat16, {"accel": "compile", "linear_dtype": "fp8"}),
    "fast-decode": (torch.bfloat16, {"fast_decode": True}),
}
# The two-process path (DiT and decoder in two CPU processes joined by gloo): its frames must be
# the one-process rollout's.
PIPELINED = "pipelined-default"


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def _inputs():
    from worldplay.models import random_text_states
    from worldplay.pose import trajectory_from_pose_string

    image = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(2)) * 2 - 1
    return image, random_text_states("tiny", 0), trajectory_from_pose_string(POSE)


def _settings(overrides: dict):
    from worldplay.rollout import RolloutSettings

    return RolloutSettings(num_chunk=NUM_CHUNK, seed=0, noise_latents=4 * NUM_CHUNK, **overrides)


def run_case(name: str) -> list[dict[str, str]]:
    from worldplay.models import random_models
    from worldplay.rollout import WorldPlayPipeline

    image, text, traj = _inputs()
    if name == PIPELINED:
        return _pipelined_chunks(image, text, traj, _settings({}))
    dtype, overrides = CASES[name]
    models = random_models("tiny", 0, device="cpu", dtype=dtype)
    pipe = WorldPlayPipeline(models.dit, models.vae, device="cpu", dtype=dtype)
    return [{"frames": _digest(o.frames), "latents": _digest(o.latents)}
            for o in pipe.rollout(image, text, traj, _settings(overrides))]


def _pipelined_chunks(image, text, traj, settings) -> list[dict[str, str]]:
    from worldplay import pipelined

    if hasattr(pipelined, "TwoDevicePipeline"):  # a stream of ChunkOutput
        pipe = pipelined.TwoDevicePipeline(pipelined.random_builder("tiny", 0), devices=("cpu", "cpu"))
        chunks = list(pipe.rollout(image, text, traj, settings))
    else:  # the code before: a list of PipelinedChunk (numpy frames)
        chunks, _ = pipelined.pipelined_rollout(pipelined.random_builder("tiny", 0), image, text, traj, settings,
                                                devices=("cpu", "cpu"))
    out = []
    for c in chunks:
        frames = c.frames if isinstance(c.frames, torch.Tensor) else torch.from_numpy(c.frames)
        out.append({"frames": _digest(frames), "latents": _digest(c.latents)})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"record the digests into {DIGESTS}")
    ap.add_argument("--cases", default=",".join([*CASES, PIPELINED]), help="comma-separated case names")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    names = [n for n in args.cases.split(",") if n]
    unknown = sorted(set(names) - {*CASES, PIPELINED})
    if unknown:
        print(f"check_bit_identical: unknown cases {unknown}; choose from {[*CASES, PIPELINED]}", file=sys.stderr)
        return 2
    recorded = json.loads(DIGESTS.read_text()) if DIGESTS.is_file() else {}
    if not args.write and not recorded:
        print(f"check_bit_identical: no digests at {DIGESTS}; record them first with --write", file=sys.stderr)
        return 2
    failed = []
    for name in names:
        t0 = time.perf_counter()
        got = run_case(name)
        took = time.perf_counter() - t0
        if args.write:
            recorded[name] = got
            print(f"{name}: recorded {len(got)} chunks ({took:.0f} s)", flush=True)
            continue
        want = recorded.get(name)
        if want is None:
            print(f"{name}: no recorded digests (run with --write on the original code)", flush=True)
            failed.append(name)
            continue
        bad = [i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b]
        if bad or len(got) != len(want):
            print(f"{name}: DIFFERS at chunks {bad} ({len(got)} chunks, {len(want)} recorded)", flush=True)
            failed.append(name)
        else:
            print(f"{name}: identical ({len(got)} chunks, {took:.0f} s)", flush=True)
    if args.write:
        if PIPELINED in recorded and "default" in recorded and recorded[PIPELINED] != recorded["default"]:
            print("check_bit_identical: the pipelined rollout differs from the one-process rollout", file=sys.stderr)
            return 1
        DIGESTS.parent.mkdir(parents=True, exist_ok=True)
        tmp = DIGESTS.with_suffix(".tmp")
        tmp.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        tmp.replace(DIGESTS)
        return 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
