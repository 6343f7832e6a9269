"""What a kind receives (:class:`RunContext`) and returns (:class:`KindOutput`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .inputs import InputManifest
from .schema import ExperimentConfig


@dataclass
class RunContext:
    config: ExperimentConfig
    run_id: str
    device: torch.device
    manifest: InputManifest
    scratch: Path  # temporary working space (synthetic image, exported weights), deleted after the run
    video_dir: Path  # this run's staging folder for videos (created on demand, renamed at the end)
    official_root: Path | None = None
    skip_official: bool = False
    official_skip_reason: str | None = None  # why, when skip_official (shown with the skipped leg)
    progress: bool = True


@dataclass
class KindOutput:
    """``summary`` goes into result.json, ``chunk_rows`` into chunks.csv, ``frame_rows`` into
    frames.csv, ``videos`` into videos.json, ``provenance`` into provenance.json; ``files`` are
    further small files of the result (relative path -> bytes, e.g. thumbnails), listed in
    result.json and covered by the digests like every other file."""

    summary: dict[str, Any]
    chunk_rows: list[dict[str, Any]]
    frame_rows: list[dict[str, Any]] = field(default_factory=list)
    videos: list[dict[str, Any]] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
