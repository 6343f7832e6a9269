"""Command line: ``worldplay run`` (one video) and the experiment commands.

Every failure exits non-zero with one line saying what was wrong and what to do; outputs are
written atomically and an existing output is never silently kept or replaced.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import sys
import time
from pathlib import Path

from .experiments.schema import ATTENTION_BACKENDS  # torch-free, like this module's top level

log = logging.getLogger("worldplay")

DEFAULT_PROMPT = "First-person view walking around ancient Athens, with Greek architecture and marble structures"
PRESET_RESOLUTION = {"wan5b": (704, 1280), "tiny": (64, 96)}


def _run_parser(sub) -> None:
    p = sub.add_parser(
        "run",
        help="generate one video from an image and a camera trajectory",
        description=(
            "Generate a video chunk by chunk (16 frames at 16 fps per chunk, 13 for the first) "
            "from one image, steered by a camera trajectory, and write an MP4 plus a per-chunk "
            "stats JSON. Weights come from --checkpoint/--base (local directories or "
            "hf://repo@commit) or from --random-init (speed tests; the frames are noise)."
        ),
    )
    p.add_argument("--image", required=True, help="first frame (PNG/JPEG); resized by truncation and centre-cropped")
    p.add_argument("--pose", required=True,
                   help="trajectory: a pose string such as 'w-31' or 'w-10,right-20,s-5' "
                        "(w/s/a/d move, up/down/left/right turn; one step per latent) or a .json file "
                        "in the official custom-trajectory format")
    p.add_argument("--num-chunk", type=int, required=True,
                   help="chunks to generate (4 latents each); the trajectory needs 4*N latents, "
                        "i.e. a pose string of 4*N-1 steps")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="text prompt (default: the official default prompt)")
    p.add_argument("--out", required=True, type=Path, help="output MP4 path; the stats go next to it (.json)")
    p.add_argument("--checkpoint", help="HY-WorldPlay weights: directory with wan_transformer/ and "
                                        "wan_distilled_model/model.pt, or hf://tencent/HY-WorldPlay@<commit>")
    p.add_argument("--base", help="Wan 2.2 TI2V-5B diffusers directory (vae/, text_encoder/, tokenizer/) "
                                  "or hf://Wan-AI/Wan2.2-TI2V-5B-Diffusers@<commit>")
    p.add_argument("--random-init", type=int, metavar="SEED",
                   help="use seeded random weights and random prompt embeddings instead of checkpoints")
    p.add_argument("--preset", choices=sorted(PRESET_RESOLUTION), default="wan5b",
                   help="model size: wan5b (the real model) or tiny (a few MB, CPU tests)")
    p.add_argument("--text-cache", type=Path, default=Path.home() / ".cache" / "worldplay" / "prompts",
                   help="directory of cached prompt embeddings (the umT5 encoder is loaded only on a miss)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (official: 0)")
    p.add_argument("--height", type=int, help="output height (default 704 for wan5b, 64 for tiny)")
    p.add_argument("--width", type=int, help="output width (default 1280 for wan5b, 96 for tiny)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--attention", default=None, choices=ATTENTION_BACKENDS,
                   help="attention backend: sdpa, fa4 (needs the flash-attn-4 package), cudnn, flash, efficient, "
                        "math (default: sdpa, or the fastest available with --fast)")
    p.add_argument("--fast", action="store_true",
                   help="the fastest exact settings (GPU: compiled blocks, CUDA graphs, FA4 or cuDNN attention, "
                        "compiled channels-last VAE decoder); the first chunks are slower while they compile")
    p.add_argument("--memory-mode", choices=["reprefill", "reuse"], default="reprefill",
                   help="reprefill: the official exact memory (default); reuse: keep memory K/V across chunks, "
                        "about 1.5x faster DiT, an approximation (its measured drift is on the model card)")
    p.add_argument("--decode-device", default=None, metavar="DEVICE",
                   help="decode on a second device (e.g. cuda:1) while --device runs the DiT of the next chunk "
                        "(two processes, torch.distributed); the frames are the same as on one device")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output instead of refusing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="worldplay", description="HY-WorldPlay WAN-5B, natively.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    try:
        from .experiments.cli import add_experiment_commands
    except ImportError:  # experiments package not present in this build
        pass
    else:
        add_experiment_commands(sub)
    from .site.publish import add_publish_command

    add_publish_command(sub)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from .media import VideoWriter, atomic_write_json, load_image
    from .models import load_real_models, random_models
    from .pose import load_trajectory
    from .rollout import RolloutSettings, WorldPlayPipeline

    # Everything that can be checked without a model is checked first.
    if args.random_init is None and not (args.checkpoint and args.base):
        raise UsageError("give --checkpoint and --base (real weights) or --random-init SEED")
    if args.random_init is not None and (args.checkpoint or args.base):
        raise UsageError("--random-init and --checkpoint/--base exclude each other")
    if args.out.suffix.lower() != ".mp4":
        raise UsageError(f"--out {args.out}: the output must end in .mp4")
    stats_path = args.out.with_suffix(".json")
    if stats_path.exists() and not args.overwrite:
        raise UsageError(f"{stats_path} exists; pass --overwrite to replace it")
    trajectory = load_trajectory(args.pose).for_chunks(args.num_chunk)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    overrides = {}
    if args.fast:
        from .experiments.legs import fastest_settings

        overrides = fastest_settings(device.type)
    if args.attention:
        overrides["attention_backend"] = args.attention
    settings = RolloutSettings(num_chunk=args.num_chunk, seed=args.seed, memory_mode=args.memory_mode,
                               **overrides)
    if args.decode_device and torch.device(args.decode_device) == device and device.type == "cuda":
        raise UsageError(f"--decode-device {args.decode_device} is --device itself; name a second GPU (e.g. cuda:1)")
    height, width = PRESET_RESOLUTION[args.preset]
    height, width = args.height or height, args.width or width
    image = load_image(args.image, width, height)
    dtype = torch.bfloat16
    if args.decode_device:
        return _run_two_devices(args, settings, trajectory, image, device, height, width, stats_path)

    with VideoWriter(args.out, fps=16, overwrite=args.overwrite) as writer:
        t0 = time.perf_counter()
        if args.random_init is not None:
            models = random_models(args.preset, args.random_init, device=device, dtype=dtype)
        else:
            models = load_real_models(args.checkpoint, args.base, device=device, dtype=dtype)
        text_states, text_identity = _prompt_states(args, device)
        load_s = time.perf_counter() - t0
        pipe = WorldPlayPipeline(models.dit, models.vae, device=device, dtype=dtype)
        chunks = []
        stream = pipe.rollout(image, text_states, trajectory, settings)
        for out in tqdm(stream, total=args.num_chunk, desc="chunks", unit="chunk", disable=args.no_progress):
            writer.append(out.frames.numpy())
            chunks.append({
                "chunk": out.index,
                "frames": int(out.frames.shape[0]),
                "memory_frames": out.memory.indices if out.memory else [],
                "retrieved_clip": out.memory.chosen_start if out.memory else None,
                "timings_ms": {k: round(v, 3) for k, v in out.timings_ms.items()},
            })
        total_frames = writer.frames_written
    stats = {
        "video": str(args.out),
        "frames": total_frames,
        "fps": 16,
        "resolution": [height, width],
        "preset": args.preset,
        "pose": args.pose,
        "num_chunk": args.num_chunk,
        "seed": args.seed,
        "prompt": args.prompt,
        "text": text_identity,
        "weights": models.identity,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "settings": dataclasses.asdict(settings),
        "load_s": round(load_s, 3),
        "chunks": chunks,
    }
    atomic_write_json(stats_path, stats)
    log.info("wrote %s (%d frames) and %s", args.out, total_frames, stats_path)
    print(f"wrote {args.out} ({total_frames} frames) and {stats_path}")
    return 0


def _prompt_states(args: argparse.Namespace, device):
    """Prompt embeddings and how they were made: seeded random ones for random weights, else the
    umT5 embedding of --prompt (from the on-disk cache when present)."""
    import torch

    from .models import random_text_states

    if args.random_init is not None:
        return random_text_states(args.preset, args.random_init), f"random-init:{args.random_init}"
    from .models import resolve_location
    from .nn.text import prompt_embeddings

    base_dir, _ = resolve_location(args.base, ["text_encoder/*", "tokenizer/*"])
    states, _ = prompt_embeddings(args.prompt, cache_dir=args.text_cache, encoder_dir=base_dir, device=device,
                                  dtype=torch.bfloat16)
    return states, "umT5 (cached)"


def _build_real(checkpoint: str, base: str, device):
    from .models import load_real_models

    return load_real_models(checkpoint, base, device=device)


def _run_two_devices(args, settings, trajectory, image, device, height: int, width: int, stats_path: Path) -> int:
    """``--decode-device``: worldplay.pipelined runs the DiT on ``device`` and the decoder on the
    other; both processes load the weights themselves."""
    from .media import VideoWriter, atomic_write_json
    from .pipelined import pipelined_rollout, random_builder

    devices = (str(device), args.decode_device)
    t0 = time.perf_counter()
    if args.random_init is not None:
        build = random_builder(args.preset, args.random_init)
    else:
        build = functools.partial(_build_real, args.checkpoint, args.base)
    text_states, text_identity = _prompt_states(args, device)
    chunks, accel = pipelined_rollout(build, image, text_states, trajectory, settings, devices=devices)
    wall_s = time.perf_counter() - t0
    with VideoWriter(args.out, fps=16, overwrite=args.overwrite) as writer:
        for out in chunks:
            writer.append(out.frames)
        total_frames = writer.frames_written
    stats = {
        "video": str(args.out), "frames": total_frames, "fps": 16, "resolution": [height, width],
        "preset": args.preset, "pose": args.pose, "num_chunk": args.num_chunk, "seed": args.seed,
        "prompt": args.prompt, "text": text_identity, "devices": {"dit": devices[0], "decode": devices[1]},
        "settings": dataclasses.asdict(settings), "accel": accel, "wall_s": round(wall_s, 3),
        "chunks": [{"chunk": c.index, "frames": int(c.frames.shape[0]), "memory_frames": c.memory_indices or [],
                    "timings_ms": {k: round(v, 3) for k, v in c.timings_ms.items()}} for c in chunks],
    }
    atomic_write_json(stats_path, stats)
    print(f"wrote {args.out} ({total_frames} frames, DiT on {devices[0]}, decode on {devices[1]}) and {stats_path}")
    return 0


class UsageError(ValueError):
    """The command line is inconsistent; the message says how to fix it."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    import torch

    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .pipelined import PipelineError
    from .pose import PoseError
    from .rollout import RolloutError

    expected: tuple[type[BaseException], ...] = (UsageError, CheckpointError, ConfigError, PoseError, RolloutError,
                                                 PipelineError, FileExistsError, FileNotFoundError)
    try:
        from .media import MediaError

        expected += (MediaError,)
    except ImportError:
        pass
    try:
        return args.func(args)
    except expected as exc:
        # A worker's traceback goes to the log; the user gets its last line.
        print(f"worldplay {args.command}: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        log.info("%s", exc)
        return 2
    except torch.OutOfMemoryError as exc:
        print(
            f"worldplay {args.command}: error: out of GPU memory ({str(exc).splitlines()[0]}); "
            "close other GPU programs, or use a smaller --height/--width",
            file=sys.stderr,
        )
        return 3
    except KeyboardInterrupt:
        print(f"worldplay {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
