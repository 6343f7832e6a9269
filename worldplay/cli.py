"""Command line: ``worldplay run`` (one video) and the experiment commands.

Every failure exits non-zero with one line saying what was wrong and what to do; outputs are
written atomically and an existing output is never silently kept or replaced. Exit statuses:

    0    done
    1    the run failed (an error no check could foresee, e.g. a full disk)
    2    bad input or usage: nothing was written (checked before any model is loaded)
    3    out of GPU memory
    130  interrupted (Ctrl-C / SIGINT); 143 terminated (SIGTERM): temporary files removed
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import functools
import logging
import os
import sys
import time
from pathlib import Path

from .constants import (  # torch-free, like this module's top level
    ATTENTION_BACKENDS,
    DEFAULT_PROMPT,
    PRESET_RESOLUTION,
)
from .lowvram import PROFILES  # torch-free too

log = logging.getLogger("worldplay")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, except where there is none to show (None, a flag's
    False) or the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def _run_parser(sub) -> None:
    p = sub.add_parser(
        "run",
        formatter_class=_HelpFormatter,
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
    p.add_argument("--third-person", action="store_true",
                   help="label the trajectory's actions in the official third-person mode (tps=True): a step that "
                        "turns keeps only its rotation label; differs from first person only for JSON trajectories "
                        "that move and turn in one step")
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
    p.add_argument("--low-vram", choices=list(PROFILES), default=None, metavar="PROFILE",
                   help="fit a smaller GPU (worldplay.lowvram): 24 (24 GB cards; fp8 weights and memory K/V), "
                        "24-exact (24 GB, exact, slower: DiT blocks streamed from host memory), 16 (16 GB cards; "
                        "fp8, every block streamed); implies the fastest settings without CUDA graphs")
    p.add_argument("--decode-device", default=None, metavar="DEVICE",
                   help="decode on a second device (e.g. cuda:1) while --device runs the DiT of the next chunk "
                        "(two processes, torch.distributed); the frames are the same as on one device")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output instead of refusing")
    p.add_argument("--allow-cpu-full", action="store_true",
                   help="run --preset wan5b on a CPU anyway (about 9 GB of RAM and minutes per chunk; refused "
                        "without this flag)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress output (a bar on a terminal; one line per step otherwise)")
    p.set_defaults(func=cmd_run)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="worldplay", description="HY-WorldPlay WAN-5B, natively.")
    parser.add_argument("--version", action="version", version=f"worldplay {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    _serve_parser(sub)
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
    """One video; under ``torchrun --nproc-per-node N -m worldplay run ...`` each process is one
    rank of the same session (worldplay.ranks) and rank 0 writes the video and the stats."""
    from .ranks.launch import from_environment

    launch = from_environment()
    if launch is None:
        return _run(args, None)
    return _run_as_rank(args, launch)


def _run(args: argparse.Namespace, group) -> int:
    """``worldplay run`` on one rank (``group`` None) or as one rank of ``group``."""
    import torch

    from .leftovers import remove_stale
    from .media import MediaExistsError, VideoWriter, atomic_write_json, check_writable_output, load_image
    from .models import load_real_models, parse_location, random_models
    from .offload import place_models
    from .pose import load_trajectory
    from .rollout import RolloutSettings, WorldPlayPipeline

    leader = group is None or group.leader
    # Everything that can be checked without a model is checked first: a bad option must not
    # cost a model load, and nothing is written before the run can succeed.
    if args.random_init is None and not (args.checkpoint and args.base):
        raise UsageError("give --checkpoint and --base (real weights) or --random-init SEED")
    if args.random_init is not None and (args.checkpoint or args.base):
        raise UsageError("--random-init and --checkpoint/--base exclude each other")
    if args.out.suffix.lower() != ".mp4":
        raise UsageError(f"--out {args.out}: the output must end in .mp4")
    device = group.device if group is not None else _parse_device("--device", args.device)
    _check_cpu_preset(args, device)
    decode_device = _parse_device("--decode-device", args.decode_device) if args.decode_device else None
    if decode_device is not None and args.low_vram:
        raise UsageError("--low-vram fits one GPU; drop --decode-device (the two-device path keeps both models resident)")
    if decode_device == device and device.type == "cuda":
        raise UsageError(f"--decode-device {args.decode_device} is --device itself; name a second GPU (e.g. cuda:1)")
    if args.random_init is None:
        parse_location(args.checkpoint)
        parse_location(args.base)
    height, width = _resolution(args)
    stats_path = args.out.with_suffix(".json")
    if leader:
        check_writable_output(args.out, overwrite=args.overwrite, what="output video")
        try:
            check_writable_output(stats_path, overwrite=args.overwrite, what="stats file")
        except MediaExistsError:  # the user named the MP4, not this JSON: say which run it belongs to
            raise MediaExistsError(f"{stats_path} (the stats file of --out {args.out}) already exists; pass "
                                   "--overwrite to replace both, or choose another --out") from None
    trajectory = load_trajectory(args.pose, third_person=args.third_person).for_chunks(args.num_chunk)
    overrides = {}
    if args.fast or args.low_vram:
        from .rollout import fastest_settings

        overrides = fastest_settings(device.type)
    if args.low_vram:
        from .lowvram import profile_settings

        overrides = profile_settings(args.low_vram, overrides, device.type)
    if args.attention:
        overrides["attention_backend"] = args.attention
    settings = RolloutSettings(num_chunk=args.num_chunk, seed=args.seed, memory_mode=args.memory_mode,
                               **overrides)
    image = load_image(args.image, width, height)
    dtype = torch.bfloat16
    if leader:
        remove_stale([args.out.parent])  # partial files of earlier runs that were killed
    if args.decode_device:
        return _run_two_devices(args, settings, trajectory, image, device, height, width, stats_path)

    writer = (VideoWriter(args.out, fps=16, overwrite=args.overwrite) if leader else contextlib.nullcontext())
    with writer, _memory_advice(args, settings, device):
        if group is not None and leader:
            group.on_abort.append(lambda _line: writer.abort())  # a peer failed: no half-written video
        progress = Progress(enabled=leader and not args.no_progress)
        t0 = time.perf_counter()
        if args.random_init is None:  # missing files fail before anything is computed
            from .models import BASE_FILES, WORLDPLAY_FILES, resolve_location

            resolve_location(args.checkpoint, WORLDPLAY_FILES)
            resolve_location(args.base, BASE_FILES)
        # The prompt before the models: on a cache miss the umT5 encoder is loaded and freed before
        # the DiT and the VAE take the memory (never resident together). Over several ranks rank 0
        # embeds it and hands it to the others (one encoder, one cache writer).
        if group is None or args.random_init is not None:
            text_states, text_identity = _prompt_states(args, device, progress)
        else:
            embedded = _prompt_states(args, device, progress) if leader else None
            text_states, text_identity = group.broadcast_object(
                None if embedded is None else (embedded[0].cpu(), embedded[1]))
            text_states = text_states.to(device)
        if group is not None:
            from .ranks.launch import check_agreement, session_facts

            check_agreement(group.ranks, session_facts(settings, image, text_states, trajectory))
        if args.random_init is not None:
            progress.line(f"building the {args.preset} model with random weights (seed {args.random_init}) on {device}")
            models = random_models(args.preset, args.random_init, device=device, dtype=dtype)
        else:
            progress.line(f"loading the weights ({args.checkpoint}, {args.base}) onto {device}")
            models = load_real_models(args.checkpoint, args.base, device=device, dtype=dtype)
        if group is not None:
            from .ranks.launch import weights_facts

            check_agreement(group.ranks, weights_facts(models))
        place_models(models, settings, device)
        load_s = time.perf_counter() - t0
        pipe = WorldPlayPipeline(models.dit, models.vae, device=device, dtype=dtype,
                                 ranks=None if group is None else group.ranks)
        chunks = []
        stream = pipe.rollout(image, text_states, trajectory, settings)
        for out in progress.chunks(stream, args.num_chunk):
            if leader:
                writer.append(out.frames.numpy())
            chunks.append({
                "chunk": out.index,
                "frames": int(out.frames.shape[0]),
                "memory_frames": out.memory.indices if out.memory else [],
                "retrieved_clip": out.memory.chosen_start if out.memory else None,
                "timings_ms": {k: round(v, 3) for k, v in out.timings_ms.items()},
            })
        peaks = None
        if group is not None:
            from .allocator import read_peaks

            peaks = group.ranks.all_gather_object({"device": str(device), **read_peaks(device)})
            group.finish()  # every rank is done: nothing of the group is used after this
        if not leader:
            return 0
        total_frames = writer.frames_written
    stats = {
        "video": str(args.out),
        "frames": total_frames,
        "fps": 16,
        "resolution": [height, width],
        "preset": args.preset,
        "pose": args.pose,
        "third_person": args.third_person,
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
    if peaks is not None:
        stats["ranks"] = {"size": len(peaks), "per_rank": peaks}
    atomic_write_json(stats_path, stats)
    log.info("wrote %s (%d frames) and %s", args.out, total_frames, stats_path)
    ranks = f", {len(peaks)} ranks" if peaks is not None else ""
    print(f"wrote {args.out} ({total_frames} frames{ranks}) and {stats_path}")
    return 0


def _run_as_rank(args: argparse.Namespace, launch) -> int:
    """One rank of ``torchrun -m worldplay run``: its device (``cuda:LOCAL_RANK`` or the CPU), the
    group, and the watchdog that ends it with the first failing rank's error."""
    from .ranks.launch import RankedRun

    if args.decode_device:
        raise UsageError("--decode-device is the two-process pipeline of one launch; under torchrun every rank runs "
                         "the DiT and the decode (drop --decode-device)")
    if args.low_vram:
        raise UsageError("--low-vram fits one GPU; over several ranks each GPU holds its share of the memory K/V and "
                         "the decode (drop --low-vram)")
    device = _parse_device("--device", args.device)
    if device.type == "cuda":
        if device.index is not None:
            raise UsageError(f"--device {args.device}: under torchrun each rank takes cuda:LOCAL_RANK; pass --device cuda")
        import torch

        if torch.cuda.device_count() <= launch.local_rank:
            raise UsageError(f"rank {launch.rank} is LOCAL_RANK {launch.local_rank} but this machine shows "
                             f"{torch.cuda.device_count()} GPU(s); use --nproc-per-node <= the GPU count")
        device = torch.device("cuda", launch.local_rank)
    with RankedRun(launch, device, prog="worldplay run", describe=describe_failure, peer_error=PeerFailed) as group:
        return _run(args, group)


@contextlib.contextmanager
def _memory_advice(args: argparse.Namespace, settings, device):
    """An out-of-memory error inside becomes one line naming what the run needs and the
    --low-vram profile that would fit (worldplay.lowvram)."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError as exc:
        from .lowvram import RunNeedsMoreMemory, out_of_memory_message
        from .rollout import fastest_settings

        height, width = _resolution(args)
        try:
            advice = out_of_memory_message(args.preset, height, width, settings, device, fastest_settings("cuda"))
        except Exception:  # noqa: BLE001 - the plan is advice; the OOM is the error to report
            log.info("no memory plan for the out-of-memory message", exc_info=True)
            advice = f"{str(exc).splitlines()[0]}; close other GPU programs, or use --low-vram or a smaller size"
        raise RunNeedsMoreMemory(advice) from exc


def _parse_device(option: str, spec: str | None):
    """``--device``/``--decode-device``: cpu, cuda or cuda:N, with that GPU present (default: cuda
    if there is one)."""
    import torch

    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"{option} {spec!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"{option} {spec}: worldplay runs on cpu or cuda, not {device.type}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UsageError(f"{option} {spec}: {why}; use --device cpu (with --preset tiny), or run on a GPU "
                             "machine")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f"{option} {spec}: this machine shows {count} GPU(s), cuda:0 to cuda:{count - 1}")
    return device


def _resolution(args: argparse.Namespace) -> tuple[int, int]:
    """``--height``/``--width`` (None: the preset's), each a positive multiple of the model's
    stride: the VAE's spatial downsampling times the DiT's patch size."""
    from .config import dit_preset, vae_preset

    stride = vae_preset(args.preset).scale_factor_spatial * dit_preset(args.preset).patch_size[-1]
    sizes = []
    for option, value, default in zip(("--height", "--width"), (args.height, args.width),
                                      PRESET_RESOLUTION[args.preset], strict=True):
        if value is None:
            value = default
        elif value <= 0 or value % stride:
            raise UsageError(f"{option} {value}: must be a positive multiple of {stride} (the {args.preset} "
                             f"model's stride), e.g. {default}")
        sizes.append(value)
    return sizes[0], sizes[1]


def _check_cpu_preset(args: argparse.Namespace, device) -> None:
    """The 5B model on a CPU takes about 9 GB of RAM and minutes per chunk: almost always a
    forgotten ``--preset tiny``, so it is refused unless asked for by name."""
    if device.type == "cpu" and args.preset == "wan5b" and not getattr(args, "allow_cpu_full", False):
        raise UsageError("--preset wan5b (the full 5B model) on a CPU needs about 9 GB of RAM and minutes per chunk; "
                         "use --preset tiny for a CPU run, or pass --allow-cpu-full to run the full model anyway")


class Progress:
    """What a run is doing, on stderr: a tqdm bar over the chunks on a terminal; elsewhere (a log
    file, a pipe, CI) one plain line per step, never a carriage return."""

    def __init__(self, enabled: bool, stream=None):
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)())

    def line(self, text: str) -> None:
        if self.enabled:
            print(f"worldplay: {text}", file=self.stream, flush=True)

    def chunks(self, stream, total: int):
        if self.enabled and self.terminal:
            from tqdm import tqdm

            yield from tqdm(stream, total=total, desc="chunks", unit="chunk", file=self.stream)
            return
        started = time.perf_counter()
        for done, out in enumerate(stream, 1):
            self.line(f"chunk {done}/{total} done ({time.perf_counter() - started:.1f} s)")
            yield out


def _prompt_states(args: argparse.Namespace, device, progress: Progress | None = None):
    """Prompt embeddings and how they were made: seeded random ones for random weights, else the
    umT5 embedding of --prompt (from the on-disk cache when present)."""
    import torch

    from .models import random_text_states

    if args.random_init is not None:
        return random_text_states(args.preset, args.random_init), f"random-init:{args.random_init}"
    from .models import resolve_location
    from .nn.text import prompt_embeddings

    if progress is not None:
        progress.line(f"embedding the prompt (cache {args.text_cache}; the umT5 encoder is loaded on a miss)")
    from .models import BASE_FILES

    base_dir, _ = resolve_location(args.base, BASE_FILES)  # the run's one resolution of --base
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
    from .pipelined import TwoDevicePipeline, random_builder

    devices = (str(device), args.decode_device)
    t0 = time.perf_counter()
    if args.random_init is not None:
        build = random_builder(args.preset, args.random_init)
    else:
        build = functools.partial(_build_real, args.checkpoint, args.base)
    text_states, text_identity = _prompt_states(args, device)
    pipe = TwoDevicePipeline(build, devices=devices)
    chunks = list(pipe.rollout(image, text_states, trajectory, settings))
    accel = pipe.last_accel_stats.to_dict()
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
        "chunks": [{"chunk": c.index, "frames": int(c.frames.shape[0]), "memory_frames": c.memory.indices if c.memory else [],
                    "timings_ms": {k: round(v, 3) for k, v in c.timings_ms.items()}} for c in chunks],
    }
    atomic_write_json(stats_path, stats)
    print(f"wrote {args.out} ({total_frames} frames, DiT on {devices[0]}, decode on {devices[1]}) and {stats_path}")
    return 0


def _serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        formatter_class=_HelpFormatter,
        help="play the world model live in a browser (WASD move, arrows or mouse look)",
        description=(
            "A local web app: choose a sample image or upload one, give a prompt, then drive with WASD "
            "(move) and the arrow keys or the mouse (look); the keys held are read once per chunk and the "
            "frames stream to the page as they decode. Binds to 127.0.0.1; any other --host needs --token. "
            "One player at a time. Needs the serve extra: pip install 'worldplay[serve]'."
        ),
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    p.add_argument("--token", default=os.environ.get("WORLDPLAY_SERVE_TOKEN"),
                   help="secret the page must present (?token=...); required for a --host other than loopback, "
                        "at least 16 characters (default: $WORLDPLAY_SERVE_TOKEN)")
    p.add_argument("--checkpoint", help="HY-WorldPlay weights (as for worldplay run)")
    p.add_argument("--base", help="Wan 2.2 TI2V-5B diffusers directory or hf://repo@commit (as for worldplay run)")
    p.add_argument("--random-init", type=int, metavar="SEED",
                   help="seeded random weights and random prompt embeddings (the frames are noise)")
    p.add_argument("--preset", choices=sorted(PRESET_RESOLUTION), default="wan5b",
                   help="model size: wan5b (the real model) or tiny (a few MB, runs on a CPU)")
    p.add_argument("--text-cache", type=Path, default=Path.home() / ".cache" / "worldplay" / "prompts",
                   help="directory of cached prompt embeddings")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of every world (official: 0)")
    p.add_argument("--height", type=int, help="frame height (default 704 for wan5b, 64 for tiny)")
    p.add_argument("--width", type=int, help="frame width (default 1280 for wan5b, 96 for tiny)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--attention", default=None, choices=ATTENTION_BACKENDS, help="attention backend (as for run)")
    p.add_argument("--fast", action="store_true",
                   help="the fastest exact settings (compiled blocks, CUDA graphs, ...); the first world after "
                        "start-up is slow while they compile")
    p.add_argument("--memory-mode", choices=["reprefill", "reuse"], default="reprefill",
                   help="reprefill: the official exact memory; reuse: faster, an approximation")
    p.add_argument("--third-person", action="store_true",
                   help="label the keys' actions in the official third-person mode (tps=True): a chunk that moves "
                        "and turns at once (e.g. W with the right arrow) keeps only its rotation label")
    p.add_argument("--max-chunks", type=int, default=900,
                   help="chunks a world may run before it has to start over (default 900, 15 minutes; the latent "
                        "history grows with it, ~1.35 MB per chunk at 704x1280)")
    p.add_argument("--lead", type=int, default=1,
                   help="chunks generated ahead of the one playing (default 1: the next chunk is generated while "
                        "this one plays; more smooths a slow GPU at the cost of latency)")
    p.add_argument("--jpeg-quality", type=int, default=85, help="JPEG quality of the streamed frames (default 85)")
    p.add_argument("--idle-timeout", type=float, default=600.0,
                   help="close a player's world after this many seconds without a message from the page")
    p.add_argument("--allow-cpu-full", action="store_true",
                   help="serve --preset wan5b on a CPU anyway (refused without this flag)")
    p.add_argument("--inputs", type=Path, default=Path("experiments") / "inputs.toml",
                   help="input manifest whose images are offered as samples (default experiments/inputs.toml, "
                        "when it exists); a built-in synthetic image is always offered")
    p.set_defaults(func=cmd_serve)


def _check_serve_options(args: argparse.Namespace) -> None:
    """What `serve` can refuse before loading anything: the network exposure, the numbers."""
    from .serve.server import is_loopback

    if not is_loopback(args.host):
        if not args.token:
            raise UsageError(f"--host {args.host} lets other machines reach the server; give --token SECRET (16+ "
                             "characters) and open the page with ?token=SECRET, or keep the default 127.0.0.1")
    if args.token is not None and (len(args.token) < 16 or not args.token.isascii() or not args.token.isprintable()
                                   or " " in args.token):
        raise UsageError("--token must be at least 16 printable ASCII characters without spaces "
                         "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))')")
    for option, value, low, high in (("--port", args.port, 0, 65535), ("--max-chunks", args.max_chunks, 1, 10**6),
                                     ("--lead", args.lead, 1, 16), ("--jpeg-quality", args.jpeg_quality, 1, 95)):
        if not low <= value <= high:
            raise UsageError(f"{option} {value}: must be in {low}..{high}")
    if not 1 <= args.idle_timeout <= 86400:
        raise UsageError(f"--idle-timeout {args.idle_timeout}: must be in 1..86400 seconds")


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise UsageError("worldplay serve needs aiohttp; install it with pip install 'worldplay[serve]'") from None
    import torch

    from .models import load_real_models, parse_location, random_models
    from .rollout import OFFICIAL_NOISE_LATENTS, RolloutSettings, WorldPlayPipeline
    from .serve.engine import Engine
    from .serve.server import ServeOptions, Server, serve_forever

    if args.random_init is None and not (args.checkpoint and args.base):
        raise UsageError("give --checkpoint and --base (real weights) or --random-init SEED")
    if args.random_init is not None and (args.checkpoint or args.base):
        raise UsageError("--random-init and --checkpoint/--base exclude each other")
    _check_serve_options(args)
    device = _parse_device("--device", args.device)
    _check_cpu_preset(args, device)
    if args.random_init is None:
        parse_location(args.checkpoint)
        parse_location(args.base)
    height, width = _resolution(args)
    overrides = {}
    if args.fast:
        from .rollout import fastest_settings

        overrides = fastest_settings(device.type)
    if args.attention:
        overrides["attention_backend"] = args.attention
    # num_chunk: what the history is preallocated for; a world runs on past it (worldplay.session).
    settings = RolloutSettings(num_chunk=OFFICIAL_NOISE_LATENTS // 4, seed=args.seed, memory_mode=args.memory_mode,
                               **overrides)
    samples = _serve_samples(args.inputs)
    dtype = torch.bfloat16
    if args.random_init is not None:
        models = random_models(args.preset, args.random_init, device=device, dtype=dtype)
    else:
        models = load_real_models(args.checkpoint, args.base, device=device, dtype=dtype)
    pipe = WorldPlayPipeline(models.dit, models.vae, device=device, dtype=dtype)

    def text_for(prompt: str):
        return _prompt_states(argparse.Namespace(**{**vars(args), "prompt": prompt or DEFAULT_PROMPT}), device)[0]

    engine = Engine(pipe, settings, (height, width), text_for, samples=samples, max_chunks=args.max_chunks,
                    seed=args.seed, random_weights=args.random_init is not None, third_person=args.third_person)
    server = Server(engine, ServeOptions(token=args.token, lead=args.lead, jpeg_quality=args.jpeg_quality,
                                         idle_timeout_s=args.idle_timeout))
    shown_host = f"[{args.host}]" if ":" in args.host else args.host

    def announce(port: int) -> None:
        mode = ", third person" if args.third_person else ""
        print(f"worldplay serve: open http://{shown_host}:{port}/{'?token=' + args.token if args.token else ''} "
              f"({args.preset}, {height}x{width}, {device}{mode}); Ctrl-C stops", flush=True)

    try:
        serve_forever(server, args.host, args.port, announce)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(f"port {args.port} on {args.host} is in use; choose another with --port") from None
        raise
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the normal way to stop a server
        from .interrupts import exit_status

        print("worldplay serve: stopped", file=sys.stderr)
        return exit_status(exc)
    return 0


def _serve_samples(manifest_path: Path) -> dict:
    """Sample images for the page: the manifest's images (each resolved when chosen)."""
    from .experiments.inputs import InputError, InputManifest

    if not manifest_path.is_file():
        return {}
    try:
        manifest = InputManifest.load(manifest_path)
    except InputError as exc:
        raise UsageError(f"--inputs {manifest_path}: {exc}") from None
    return {ident: functools.partial(manifest.resolve, ident) for ident in manifest.ids("image")}


class UsageError(ValueError):
    """The command line is inconsistent; the message says how to fix it."""


# errno values that mean "this path is wrong for that use": bad input (2), not a failure of the run (1)
_PATH_ERRNOS = {errno.ENOENT, errno.EEXIST, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EROFS,
                errno.ENAMETOOLONG, errno.ELOOP}


def os_error_text(exc: OSError) -> str:
    """``cannot access X: Permission denied`` rather than ``[Errno 13] Permission denied: 'X'``."""
    if exc.strerror is None:
        return str(exc)
    if exc.filename is None:
        return exc.strerror
    target = str(exc.filename) + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
    return f"cannot access {target}: {exc.strerror}"


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 1 the run failed, 2 bad input or usage (nothing written), 3 out of GPU
    memory, 130 interrupted (SIGINT), 143 terminated (SIGTERM); errors are one line on stderr."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not args.verbose:  # the hub's retry warnings would precede our one-line error; read when it is imported
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    from .allocator import configure_allocator

    configure_allocator()  # before CUDA starts: expandable segments unless the user chose otherwise
    from .interrupts import report_interrupt, sigterm_raises

    prog = f"worldplay {args.command}"
    try:
        with sigterm_raises():
            return args.func(args)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (interrupts.Terminated)
        return report_interrupt(prog, exc)
    except Exception as exc:
        described = describe_failure(exc)
        if described is None:
            raise
        status, line = described
        print(f"{prog}: error: {line}", file=sys.stderr)
        log.info("%s", exc)  # a worker's traceback goes to the log; the user gets its last line
        return status


def describe_failure(exc: BaseException) -> tuple[int, str] | None:
    """(exit status, one-line message) of an error a command reports, or None for an error no
    check foresaw (it propagates with its traceback, exit 1). The one mapping of errors to
    statuses: ``main`` prints it; a rank of ``torchrun -m worldplay run`` also hands it to the
    other ranks (:mod:`worldplay.ranks.launch`)."""
    import torch

    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .lowvram import RunNeedsMoreMemory
    from .nn.text import TextExtraMissing
    from .pipelined import PipelineError
    from .pose import PoseError
    from .ranks.launch import RankError
    from .ranks.spawn import RanksFailed
    from .rollout import RolloutError

    expected: tuple[type[BaseException], ...] = (UsageError, CheckpointError, ConfigError, PoseError, RolloutError,
                                                 PipelineError, RankError, RanksFailed, TextExtraMissing)
    try:
        from .media import MediaError

        expected += (MediaError,)
    except ImportError:
        pass
    if isinstance(exc, PeerFailed):
        return exc.status, str(exc)
    if isinstance(exc, expected):
        return 2, str(exc).splitlines()[0]
    if isinstance(exc, RunNeedsMoreMemory):
        return 3, f"out of GPU memory: {exc}; nothing was written"
    if isinstance(exc, torch.OutOfMemoryError):
        return 3, (f"out of GPU memory ({str(exc).splitlines()[0]}); close other GPU programs, or use a smaller "
                   "--height/--width")
    if isinstance(exc, OSError):
        return (2 if exc.errno is None or exc.errno in _PATH_ERRNOS else 1), os_error_text(exc)
    return None


class PeerFailed(RuntimeError):
    """Another rank of this run failed first; the message is its error, ``status`` its exit status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status

if __name__ == "__main__":
    sys.exit(main())
