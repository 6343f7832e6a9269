"""Run the official HY-WorldPlay WAN pipeline on weights we provide (the "official leg").

Must run under torch.distributed's launcher, one process (the official pipeline needs an
initialised process group and reads WORLD_SIZE):

    python3 -m torch.distributed.run --nproc_per_node=1 scripts/official_rollout.py \\
        --official .official/official --weights /tmp/weights --image .official/official/assets/img/1.png \\
        --pose w-31 --num-chunk 8 --random-text 0 --no-compile --out /tmp/official_out

The official code and its pinned dependencies come from outside this repository:
``scripts/make_official_env.sh CHECKOUT DEST`` downloads the wheels (diffusers 0.35.0,
transformers 4.57.6, huggingface_hub 0.36.0, tokenizers 0.22.1, remote_pdb) into DEST/wheels
and exports the official ``wan/`` and ``hyvideo/`` into DEST/official. On the device:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/offsite .official/wheels/*.whl
    PYTHONPATH=/tmp/offsite python3 -m torch.distributed.run --nproc_per_node=1 \\
        scripts/official_rollout.py --official .official/official ...

(the leg itself puts the sageattention stub, the checkout root and checkout/wan on sys.path).
``--weights`` is a folder written by ``worldplay.official.export_weights``.

Writes to --out: ``chunk_NNN_latents.safetensors`` (key ``latents``, float32 [1, 48, 4, 44, 80]),
``chunk_NNN_frames.npy`` (uint8 [T, 704, 1280, 3], unless --no-frames) and ``stats.json``
(environment, per-chunk timings in ms, memory indices, sha256 of every chunk's latents and frames,
and the median over the steady chunks). Exit status 2: wrong usage or launch; 1: a failure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

LAUNCH_HINT = (
    "official_rollout.py: WORLD_SIZE is not set. The official pipeline needs torch.distributed; launch with\n"
    "  python3 -m torch.distributed.run --nproc_per_node=1 scripts/official_rollout.py ARGS...\n"
    "with the carried wheels first on PYTHONPATH (see --help)."
)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="official_rollout.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--official", type=Path, required=True, help="HY-WorldPlay checkout (or the exported DEST/official)"
    )
    ap.add_argument(
        "--weights", type=Path, required=True, help="folder written by worldplay.official.export_weights"
    )
    ap.add_argument("--image", type=Path, required=True, help="first-frame image")
    ap.add_argument(
        "--pose", required=True, help="pose string (e.g. w-31) or trajectory .json, as `worldplay run`"
    )
    ap.add_argument("--num-chunk", type=int, required=True, help="chunks of 4 latents to generate")
    ap.add_argument("--seed", type=int, default=0, help="torch.manual_seed (the official code hard-wires 0)")
    ap.add_argument(
        "--num-frames", type=int, default=961, help="sizes the noise tensor (official default 961)"
    )
    text = ap.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt-embeds", type=Path, help="safetensors file with one [1, 512, 4096] tensor")
    text.add_argument("--random-text", type=int, metavar="SEED",
                      help="worldplay.models.random_text_states('wan5b', SEED), as `worldplay run --random-init SEED`")  # fmt: skip
    comp = ap.add_mutually_exclusive_group()
    comp.add_argument("--compile", dest="compile", action="store_true", default=True,
                      help="keep the official torch.compile calls (as shipped; default)")  # fmt: skip
    comp.add_argument("--no-compile", dest="compile", action="store_false",
                      help="run eagerly (torch._dynamo.config.disable = True)")  # fmt: skip
    ap.add_argument("--out", type=Path, required=True, help="output folder (created)")
    ap.add_argument(
        "--no-frames", action="store_true", help="do not write the frames (their sha256 is still recorded)"
    )
    ap.add_argument(
        "--steady-from", type=int, default=4, help="first chunk counted in the steady-state medians"
    )
    ap.add_argument(
        "--device", default=None, help="default cuda:$LOCAL_RANK; 'cpu' is a smoke test for tiny weights"
    )
    ap.add_argument("--sdpa-backend", default="default", choices=["default", "flash", "efficient", "math"],
                    help="restrict PyTorch's SDPA dispatcher (the official code already disables cuDNN "
                         "attention; 'default' then picks flash). Used for kernel-noise floors.")
    ap.add_argument("--text-preset", default="wan5b", choices=["wan5b", "tiny"],
                    help="model preset whose text width --random-text uses (tiny: CPU smoke tests)")  # fmt: skip
    return ap


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_prompt_embeds(args):
    import torch

    if args.prompt_embeds is not None:
        from safetensors.torch import load_file

        tensors = load_file(str(args.prompt_embeds))
        if len(tensors) != 1:
            raise SystemExit(f"{args.prompt_embeds}: expected one tensor, found {sorted(tensors)}")
        (emb,) = tensors.values()
        source = f"file:{args.prompt_embeds}"
    else:
        from worldplay.models import random_text_states

        emb = random_text_states(args.text_preset, args.random_text)
        source = f"random-text:{args.random_text}"
    if emb.ndim == 2:
        emb = emb[None]
    return emb.to(torch.bfloat16), source


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "WORLD_SIZE" not in os.environ and not {"-h", "--help"} & set(argv):
        print(LAUNCH_HINT, file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    if args.num_chunk < 1:
        print("--num-chunk must be >= 1", file=sys.stderr)
        return 2
    for path, what in ((args.official, "--official"), (args.weights, "--weights")):
        if not path.is_dir():
            print(f"{what} {path}: no such directory", file=sys.stderr)
            return 2
    if not args.image.is_file():
        print(f"--image {args.image}: no such file", file=sys.stderr)
        return 2

    import numpy as np
    import torch
    from safetensors.torch import save_file

    from worldplay.official import OfficialLeg
    from worldplay.pose import PoseError, load_trajectory

    try:
        traj = load_trajectory(args.pose).for_chunks(args.num_chunk)
    except (PoseError, OSError, ValueError) as exc:
        print(f"--pose: {exc}", file=sys.stderr)
        return 2
    prompt_embeds, text_source = load_prompt_embeds(args)
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    leg = OfficialLeg(args.official, args.weights, device=args.device, compile=args.compile)
    load_s = time.perf_counter() - t0
    if args.sdpa_backend != "default":
        # Global flags, read by the dispatcher at every call (the stub calls plain SDPA).
        for name in ("flash", "efficient", "math"):
            keep = name == args.sdpa_backend
            {"flash": torch.backends.cuda.enable_flash_sdp, "efficient": torch.backends.cuda.enable_mem_efficient_sdp,
             "math": torch.backends.cuda.enable_math_sdp}[name](keep)
    env = leg.environment()
    print(json.dumps(env), flush=True)

    # The official pose_to_input dtypes: float64 w2c, float64 normalised K, int64 labels.
    viewmats = torch.from_numpy(np.array(traj.viewmats))
    Ks = torch.from_numpy(np.array(traj.intrinsics))
    actions = torch.from_numpy(np.array(traj.actions))

    chunks = []
    t1 = time.perf_counter()
    for res in leg.rollout(args.image, prompt_embeds, viewmats, Ks, actions, args.num_chunk,
                           seed=args.seed, num_frames=args.num_frames):  # fmt: skip
        stem = args.out / f"chunk_{res.index:03d}"
        latents = res.latents.contiguous()
        save_file({"latents": latents}, str(stem) + "_latents.safetensors")
        if not args.no_frames:
            np.save(str(stem) + "_frames.npy", res.frames)
        row = {
            "chunk": res.index,
            "frames": int(res.frames.shape[0]),
            "memory_indices": res.memory_indices,
            "timings_ms": res.timings_ms,
            "peak_memory_bytes": res.peak_memory_bytes,
            "sha256_latents": _sha256(latents.numpy().tobytes()),
            "sha256_frames": _sha256(np.ascontiguousarray(res.frames).tobytes()),
        }
        chunks.append(row)
        t = res.timings_ms
        print(f"chunk {res.index}: dit {t['dit']:.1f} ms (prefill {t['prefill']:.1f}, steps {t['steps']:.1f}), "
              f"decode {t['decode']:.1f} ms, memory {res.memory_indices}", flush=True)  # fmt: skip

    steady = [c for c in chunks if c["chunk"] >= args.steady_from] or chunks[-1:]
    summary = {
        key: statistics.median(c["timings_ms"][key] for c in steady)
        for key in ("dit", "prefill", "steps", "decode")
    }
    summary["total"] = summary["dit"] + summary["decode"]
    summary["chunks"] = [c["chunk"] for c in steady]
    stats = {
        "leg": "official",
        "argv": argv,
        "pose": args.pose,
        "trajectory": traj.source,
        "num_chunk": args.num_chunk,
        "seed": args.seed,
        "num_frames": args.num_frames,
        "text": text_source,
        "weights": str(args.weights),
        "environment": env,
        "load_s": load_s,
        "rollout_s": time.perf_counter() - t1,
        "steady_median_ms": summary,
        "chunks": chunks,
    }
    tmp = args.out / "stats.json.tmp"
    tmp.write_text(json.dumps(stats, indent=2) + "\n")
    tmp.replace(args.out / "stats.json")
    print(f"wrote {args.out}/stats.json; steady median (chunks {summary['chunks']}): "
          f"dit {summary['dit']:.1f} ms, decode {summary['decode']:.1f} ms", flush=True)  # fmt: skip
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
