"""``rollouts``: every input image x every pose -> one MP4 each, per-chunk stats, and a
video-manifest entry per video (id, experiment, config hash, sha256, bytes, frames, fps,
resolution; ``url`` stays empty until the video is published).

Videos are written outside the repository (``--video-dir``, default ``runs/videos``, git-ignored)
into a staging folder that the runner renames to ``<video-dir>/<experiment>/<run-id>/`` when the
whole run is complete. Prompts: the official caption of each sample image; with random weights,
seeded random prompt embeddings stand in (the caption is recorded, not encoded).
"""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

from ...media import VideoWriter, video_info
from ...pose import pose_slug  # one home: the config check refuses poses that share a slug
from ..context import KindOutput, RunContext
from ..legs import (
    load_models,
    native_leg,
    native_rollout,
    prepare_image,
    prompt_for,
    text_states,
    trajectory_for,
)
from ..schema import RolloutsConfig
from .paired import timing_summary

FPS = 16


def run(ctx: RunContext) -> KindOutput:
    cfg: RolloutsConfig = ctx.config  # type: ignore[assignment]
    height, width = cfg.resolution
    leg = native_leg(cfg.leg, ctx.device.type)
    # Every input is resolved (and verified) before any model work.
    trajectories = {pose: trajectory_for(pose, cfg.num_chunk, ctx.manifest) for pose in cfg.poses}
    images = {image: (*prepare_image(image, cfg, ctx.manifest, ctx.scratch), *prompt_for(image, ctx.manifest))
              for image in cfg.inputs}
    provenance: dict[str, Any] = {"inputs": {}, "trajectories": {p: t.source for p, t in trajectories.items()}}
    models = load_models(cfg.weights, cfg.preset, ctx.device, provenance)
    ctx.video_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    videos: list[dict[str, Any]] = []
    per_video: dict[str, Any] = {}
    jobs = [(image, pose) for image in cfg.inputs for pose in cfg.poses]
    text_cache: dict[str, tuple] = {}
    for image, pose in tqdm(jobs, desc="videos", unit="video", disable=not ctx.progress):
        image_path, image_identity, prompt, prompt_source = images[image]
        if prompt not in text_cache:
            text_cache[prompt] = text_states(cfg, prompt, ctx.device)
        text, text_identity = text_cache[prompt]
        provenance["inputs"][image] = {**image_identity, "prompt_source": prompt_source, "text": text_identity}
        video_id = f"{cfg.name}--{image}--{pose_slug(pose)}"
        path = ctx.video_dir / f"{video_id}.mp4"
        chunks = []
        with VideoWriter(path, fps=FPS) as writer:
            for chunk in native_rollout(models, leg, cfg, image_path, text, trajectories[pose], ctx.device,
                                        desc=video_id, progress=ctx.progress):
                writer.append(chunk.frames)
                chunks.append(chunk)
                for stage, ms in chunk.timings_ms.items():
                    rows.append({"video": video_id, "input": image, "pose": pose, "chunk": chunk.index,
                                 "stage": stage, "ms": round(float(ms), 4),
                                 "memory_latents": len(chunk.memory_indices or []),
                                 "retrieved_clip": chunk.retrieved_clip})
        info = video_info(path)
        videos.append({
            "id": video_id,
            "experiment": cfg.name,
            "run_id": ctx.run_id,
            "config_hash": cfg.config_hash,
            "file": f"{cfg.name}/{ctx.run_id}/{path.name}",
            "sha256": info["sha256"],
            "bytes": info["bytes"],
            "frames": info["frames"],
            "fps": info["fps"],
            "resolution": [info["height"], info["width"]],
            "input": image,
            "pose": pose,
            "prompt_source": "random embeddings (random weights)" if cfg.weights.is_random else prompt_source,
            "url": "",
        })
        per_video[video_id] = {
            "frames": info["frames"],
            "retrieved_clips": {str(c.index): c.retrieved_clip for c in chunks if c.index >= 4},
            "memory_indices": {str(c.index): c.memory_indices for c in chunks if c.memory_indices is not None},
            "steady_ms": timing_summary(chunks),
        }
    summary = {
        "videos": len(videos),
        "leg": {"name": cfg.leg, "settings": leg.describe(cfg)},
        "resolution": [height, width],
        "fps": FPS,
        "prompts": "random prompt embeddings (random weights; captions recorded in provenance)"
                   if cfg.weights.is_random else "official captions (test_case.csv), umT5",
        "per_video": per_video,
    }
    return KindOutput(summary=summary, chunk_rows=rows, videos=videos, provenance=provenance)
