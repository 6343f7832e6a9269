"""``worldplay publish --to <fsspec URL> --base-url <https URL>``: host the rollout videos.

For every entry of the video manifests (``videos.json`` of the latest result of each rollouts
experiment, or of the ``--experiment`` named), the MP4 is found locally (``--video-dir``, else
the video folder recorded in the run's provenance, else ``runs/videos``) and checked against
the manifest's sha256; it is copied to ``<to>/<file>`` with fsspec (skipped when an identical
copy is already there), read back and verified by sha256. Only when every video of a manifest
is in place and verified is the manifest rewritten (atomically) with
``url = <base-url>/<file>``. Any mismatch stops with an error and leaves the manifest as it was.

The target can be anything fsspec writes to: a plain path or ``file:///...`` (tests, a folder
served by a web server), ``s3://...``, ``gcs://...``, ``hf://...`` with the matching fsspec
backend installed. ``--base-url`` must be the https URL under which the target is served.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from . import SiteError
from .gallery import check_https_url

CHUNK = 1 << 20


class PublishError(SiteError):
    """A video could not be published; the manifest was left unchanged."""


@dataclass(frozen=True)
class Published:
    id: str
    url: str
    uploaded: bool  # False: an identical copy was already at the target


def _sha256_stream(fh) -> str:
    h = hashlib.sha256()
    while block := fh.read(CHUNK):
        h.update(block)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return _sha256_stream(fh)


def manifests(results_root: Path, experiments_dir: Path, names: list[str] | None) -> list[Path]:
    """``videos.json`` of the latest result of each named (default: every) experiment that has one."""
    from ..experiments.results import latest_result
    from ..experiments.schema import experiment_names

    out = []
    for name in names or experiment_names(experiments_dir):
        latest = latest_result(results_root, name)
        if latest is None:
            if names:
                raise PublishError(f"experiment '{name}': no result under {results_root / name}")
            continue
        path = latest / "videos.json"
        if path.is_file():
            out.append(path)
        elif names:
            raise PublishError(f"experiment '{name}': its latest result {latest.name} has no videos.json "
                               "(only rollouts experiments make videos)")
    return out


def video_dirs(result_dir: Path, explicit: Path | None) -> list[Path]:
    """Where the videos of a result may be on this machine, in order."""
    if explicit is not None:
        return [explicit]
    from .load import REPO_ROOT

    dirs = []
    try:
        prov = json.loads((result_dir / "provenance.json").read_text(encoding="utf-8"))
        recorded = Path(prov.get("options", {}).get("video_dir") or "")
        if str(recorded) not in ("", "."):
            dirs.append(recorded if recorded.is_absolute() else Path(prov.get("cwd") or ".") / recorded)
    except (OSError, json.JSONDecodeError):
        pass
    dirs += [REPO_ROOT / "runs" / "videos", Path.cwd() / "runs" / "videos"]
    return list(dict.fromkeys(dirs))


def publish_manifest(manifest: Path, to: str, base_url: str, *, video_dir: Path | None = None,
                     log=print) -> list[Published]:
    """Upload every video of one manifest, verify it, then fill the URLs in (atomically)."""
    import fsspec

    from ..media import atomic_write_json

    base_url = check_https_url(base_url.rstrip("/"), "--base-url")
    entries: list[dict[str, Any]] = json.loads(manifest.read_text(encoding="utf-8"))
    fs, root = fsspec.core.url_to_fs(to)
    root = root.rstrip("/")
    dirs = video_dirs(manifest.parent, video_dir)
    done = []
    for entry in entries:
        what = f"experiment '{entry.get('experiment')}', video '{entry.get('id')}'"
        rel = entry["file"]
        if rel.startswith("/") or ".." in Path(rel).parts:
            raise PublishError(f"{what}: manifest file {rel!r} must be a relative path inside the video folder")
        local = next((d / rel for d in dirs if (d / rel).is_file()), None)
        if local is None:
            raise PublishError(f"{what}: {rel} is not in any of {', '.join(map(str, dirs))}; pass --video-dir")
        sha = sha256_file(local)
        if sha != entry["sha256"]:
            raise PublishError(f"{what}: {local} has sha256 {sha[:16]}…, the manifest says "
                               f"{entry['sha256'][:16]}…; it is not the video of this result")
        remote = f"{root}/{rel}"
        uploaded = False
        if not (fs.exists(remote) and _remote_sha(fs, remote) == sha):
            fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(local), remote)
            uploaded = True
        got = _remote_sha(fs, remote)
        if got != sha:
            raise PublishError(f"{what}: the copy at {remote} has sha256 {got[:16]}…, expected {sha[:16]}…; "
                               "the manifest was not changed")
        url = f"{base_url}/{quote(rel)}"
        check_https_url(url, what)
        done.append(Published(id=entry["id"], url=url, uploaded=uploaded))
        log(f"{entry['id']}: {'uploaded' if uploaded else 'already there'}, sha256 verified -> {url}")
    by_id = {p.id: p.url for p in done}
    updated = [{**e, "url": by_id[e["id"]]} for e in entries]
    atomic_write_json(manifest, updated)
    return done


def _remote_sha(fs, path: str) -> str:
    with fs.open(path, "rb") as fh:
        return _sha256_stream(fh)


def add_publish_command(sub) -> None:
    """Add ``publish`` to the ``worldplay`` command line (``worldplay.cli.build_parser``)."""
    p = sub.add_parser(
        "publish",
        help="upload the rollout videos (fsspec) and fill their https URLs into the video manifests",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    p.add_argument("--to", required=True, metavar="FSSPEC_URL",
                   help="target folder: a path, file:///..., s3://bucket/prefix, ... (fsspec)")
    p.add_argument("--base-url", required=True, metavar="HTTPS_URL",
                   help="the https URL under which the target folder is served")
    p.add_argument("--experiment", action="append", metavar="NAME",
                   help="publish this rollouts experiment's latest result (repeatable; default: every one with videos)")
    p.add_argument("--video-dir", type=Path, default=None,
                   help="local video folder (default: the one recorded in the run's provenance, else runs/videos)")
    p.add_argument("--experiments-dir", type=Path, default=None, help="pinned configs (default: experiments/)")
    p.add_argument("--results-root", type=Path, default=None, help="results (default: <experiments-dir>/results)")
    p.set_defaults(func=cmd_publish)


def cmd_publish(args: argparse.Namespace) -> int:
    from ..experiments.results import default_experiments_dir, default_results_root

    experiments_dir = args.experiments_dir or default_experiments_dir()
    results_root = args.results_root or default_results_root(experiments_dir)
    try:
        check_https_url(args.base_url, "--base-url")
        paths = manifests(results_root, experiments_dir, args.experiment)
        if not paths:
            raise PublishError(f"no video manifests under {results_root}; run a rollouts experiment first")
        total = 0
        for path in paths:
            total += len(publish_manifest(path, args.to, args.base_url, video_dir=args.video_dir))
            print(f"updated {path}")
    except (SiteError, OSError) as exc:
        print(f"worldplay publish: error: {exc}", file=sys.stderr)
        return 2
    print(f"published {total} videos from {len(paths)} manifest(s)")
    return 0


__all__ = ["PublishError", "Published", "add_publish_command", "publish_manifest", "sha256_file"]
