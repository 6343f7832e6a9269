"""The video manifest (``videos.json`` of a rollouts result): its schema, checked where it is read.

A manifest is a JSON list of entries, one per video, written by the rollouts kind
(:mod:`worldplay.experiments.kinds.rollouts`) and, for ``url``, by ``worldplay publish``. Both
readers, the site's render step and publish, go through :func:`load_video_manifest`, so a bad
manifest fails the same way everywhere: one :class:`VideoManifestError` naming the file, the
entry, the field and what to do -- never a traceback from deep inside a page writer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from . import SiteError

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class VideoManifestError(SiteError):
    """A ``videos.json`` is not a valid video manifest."""


def _text(value: Any) -> bool:
    return isinstance(value, str)


def _id(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _count(minimum: int) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")


def _sha256(value: Any) -> bool:
    return isinstance(value, str) and bool(_SHA256.match(value))


def _resolution(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_count(1)(v) for v in value)


def _relative_file(value: Any) -> bool:
    if not isinstance(value, str) or not value or "\\" in value or "\x00" in value:
        return False
    path = PurePosixPath(value)
    return not path.is_absolute() and ".." not in path.parts and path.name not in ("", ".")


#: field -> (check, what a valid value is); the first block is required.
REQUIRED = {
    "id": (_id, "a non-empty string, unique in the manifest"),
    "file": (_relative_file, "a relative path inside the video folder ('<experiment>/<run-id>/<id>.mp4')"),
    "sha256": (_sha256, "64 lower-case hex digits (the MP4's sha256)"),
    "frames": (_count(1), "a whole number >= 1"),
    "fps": (_positive_number, "a number > 0"),
    "resolution": (_resolution, "[height, width], whole numbers >= 1"),
    "url": (_text, "a string: '' (not hosted yet) or the https URL that `worldplay publish` fills in"),
}
OPTIONAL = {
    "experiment": (_text, "a string"),
    "run_id": (_text, "a string"),
    "config_hash": (_text, "a string"),
    "bytes": (_count(0), "a whole number >= 0"),
    "input": (_text, "a string"),
    "pose": (_text, "a string"),
    "prompt_source": (_text, "a string"),
}
FIX = "it is written by `worldplay experiment run` (rollouts) and `worldplay publish`; restore it or re-run"


def check_video_manifest(data: Any, source: str | Path) -> list[dict[str, Any]]:
    """The entries of a parsed manifest, or :class:`VideoManifestError` for the first problem."""
    if not isinstance(data, list):
        raise VideoManifestError(f"{source}: a video manifest is a JSON list of entries, got {type(data).__name__}; "
                                 f"{FIX}")
    seen: dict[str, int] = {}
    for i, entry in enumerate(data):
        where = f"{source}: entry #{i}"
        if not isinstance(entry, dict):
            raise VideoManifestError(f"{where}: must be a JSON object, got {type(entry).__name__}; {FIX}")
        if _id(entry.get("id")):
            where += f" (id {entry['id']!r})"
        missing = [k for k in REQUIRED if k not in entry]
        if missing:
            raise VideoManifestError(f"{where}: lacks {', '.join(missing)}; {FIX}")
        unknown = sorted(set(entry) - set(REQUIRED) - set(OPTIONAL))
        if unknown:
            raise VideoManifestError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; allowed: "
                                     f"{', '.join([*REQUIRED, *OPTIONAL])}")
        for key, value in entry.items():
            check, valid = REQUIRED.get(key) or OPTIONAL[key]
            if not check(value):
                shown = json.dumps(value, ensure_ascii=True)
                shown = shown if len(shown) <= 60 else shown[:57] + "..."
                raise VideoManifestError(f"{where}: field '{key}' must be {valid}, got {shown}; {FIX}")
        if entry["id"] in seen:
            raise VideoManifestError(f"{where}: id {entry['id']!r} is also the id of entry #{seen[entry['id']]}; "
                                     f"every video needs its own id (publish fills in URLs by id); {FIX}")
        seen[entry["id"]] = i
    return data


def load_video_manifest(path: Path) -> list[dict[str, Any]]:
    """Read and check ``path`` (a ``videos.json``)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VideoManifestError(f"{path}: unreadable video manifest: {exc}") from None
    return check_video_manifest(data, path)


__all__ = ["VideoManifestError", "check_video_manifest", "load_video_manifest"]
