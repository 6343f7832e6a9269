"""Differences between two rollouts of the same inputs: per frame, per chunk, overall.

Frames are compared as uint8 before any video encoding (``|a - b|`` in int16, mean over pixels
and channels); latents by their relative L2 error against the reference leg.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .legs import LegChunk

VISIBLE_THRESHOLD = 5.0  # per-frame mean |delta| (uint8) above which a difference is called visible


def _psnr(mse: float) -> float | None:
    return None if mse == 0 else round(10 * math.log10(255.0**2 / mse), 3)


def compare_runs(test: list[LegChunk], ref: list[LegChunk], label: str) -> tuple[list[dict], list[dict], dict]:
    """(per-chunk rows, per-frame rows, summary) of ``test`` against ``ref``."""
    if len(test) != len(ref):
        raise ValueError(f"{label}: {len(test)} chunks vs {len(ref)} chunks")
    chunk_rows: list[dict[str, Any]] = []
    frame_rows: list[dict[str, Any]] = []
    frame_index = 0
    all_abs_sum, all_count = 0.0, 0
    for a, b in zip(test, ref, strict=True):
        if a.frames.shape != b.frames.shape:
            raise ValueError(f"{label}: chunk {a.index} frames {a.frames.shape} vs {b.frames.shape}")
        diff = np.abs(a.frames.astype(np.int16) - b.frames.astype(np.int16))
        per_frame = diff.reshape(diff.shape[0], -1).mean(axis=1)
        per_frame_max = diff.reshape(diff.shape[0], -1).max(axis=1)
        sq = (diff.astype(np.float64) ** 2).reshape(diff.shape[0], -1).mean(axis=1)
        for i in range(diff.shape[0]):
            frame_rows.append({"comparison": label, "frame": frame_index, "chunk": a.index,
                               "mean_abs_diff": round(float(per_frame[i]), 4), "max_abs_diff": int(per_frame_max[i]),
                               "psnr_db": _psnr(float(sq[i]))})
            frame_index += 1
        la, lb = a.latents.double(), b.latents.double()
        ref_norm = float(torch.linalg.vector_norm(lb))
        rel = float(torch.linalg.vector_norm(la - lb)) / ref_norm if ref_norm else float("nan")
        all_abs_sum += float(diff.sum())
        all_count += diff.size
        chunk_rows.append({
            "comparison": label,
            "chunk": a.index,
            "frames": int(diff.shape[0]),
            "mean_abs_diff": round(float(diff.mean()), 4),
            "max_abs_diff": int(diff.max()),
            "frames_over_5": int((per_frame > VISIBLE_THRESHOLD).sum()),
            "psnr_db": _psnr(float(sq.mean())),
            "latent_rel_error": round(rel, 6),
            "latent_max_abs_diff": round(float((la - lb).abs().max()), 6),
            "memory_match": a.memory_indices == b.memory_indices,
        })
    summary = {
        "mean_abs_diff": round(all_abs_sum / max(all_count, 1), 4),
        "per_chunk_mean_abs_diff": [r["mean_abs_diff"] for r in chunk_rows],
        "per_chunk_latent_rel_error": [r["latent_rel_error"] for r in chunk_rows],
        "last_chunk_mean_abs_diff": chunk_rows[-1]["mean_abs_diff"],
        "max_latent_rel_error": max(r["latent_rel_error"] for r in chunk_rows),
        "frames_over_5": sum(r["frames_over_5"] for r in chunk_rows),
        "frames": frame_index,
        "memory_selection_identical": all(r["memory_match"] for r in chunk_rows),
        "units": "mean |delta| in uint8 levels (0-255) over raw frames before video encoding; "
                 "latent error = ||test - ref|| / ||ref|| per chunk",
    }
    return chunk_rows, frame_rows, summary
