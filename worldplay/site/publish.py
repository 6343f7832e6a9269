"""``worldplay publish --to <fsspec URL> --base-url <https URL>``: host the rollout videos.

For every entry of the video manifests (``videos.json`` of the latest result of each rollouts
experiment, or of the ``--experiment`` named), the MP4 is found locally (``--video-dir``, else
the video folder recorded in the run's provenance, else ``runs/videos``) and checked against
the manifest's sha256; it is copied to ``<to>/<file>`` with fsspec (skipped when an identical
copy is already there), read back and verified by sha256. Only when every video of a manifest
is in place and verified is the manifest rewritten (atomically) with
``url = <base-url>/<file>``, and the result's digest manifest updated to match. Any mismatch
stops with an error and leaves the manifest as it was. The manifest is read with the site's
loader (:func:`worldplay.site.videos.load_video_manifest`: ids unique, every field typed), and
the result folder must verify against its digests first, so publish never rewrites a result
that was edited after its run.

The target can be anything fsspec writes to: a plain path or ``file:///...`` (tests, a folder
served by a web server), ``s3://...``, ``gcs://...``, ``hf://...`` with the matching fsspec
backend installed; ``--endpoint-url`` points an ``s3://`` target at an S3-compatible server
(MinIO, Ceph, R2, a local test server). ``--base-url`` must be the https URL under which the
target is served (a CDN or the bucket's public https address): only https URLs reach the
manifest, so a local endpoint's own ``http://`` address is never written there.
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

from ..files import sha256_file
from . import SiteError
from .gallery import check_https_url
from .videos import load_video_manifest

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
    except (OSError, ValueError, AttributeError, TypeError):  # no usable record: the defaults
        pass
    dirs += [REPO_ROOT / "runs" / "videos", Path.cwd() / "runs" / "videos"]
    return list(dict.fromkeys(dirs))


def publish_manifest(manifest: Path, to: str, base_url: str, *, video_dir: Path | None = None,
                     log=print, storage_options: dict[str, Any] | None = None) -> list[Published]:
    """Upload every video of one manifest, verify it, then fill the URLs in (atomically) and
    update the result's digests."""
    import fsspec

    from ..experiments.results import ResultError, verify_result, write_digests
    from ..media import atomic_write_json

    base_url = check_https_url(base_url.rstrip("/"), "--base-url")
    try:
        config_hash = verify_result(manifest.parent).config_hash
    except ResultError as exc:
        raise PublishError(f"{manifest}: its result does not verify, so it is not published: {exc}") from None
    entries: list[dict[str, Any]] = load_video_manifest(manifest)
    fs, root = fsspec.core.url_to_fs(to, **(storage_options or {}))
    root = root.rstrip("/")
    dirs = video_dirs(manifest.parent, video_dir)
    done = []
    for entry in entries:
        what = f"experiment '{entry.get('experiment', manifest.parent.parent.name)}', video {entry['id']!r}"
        rel = entry["file"]  # a relative path inside the video folder (checked by the loader)
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
        log(f"{entry['id']!r}: {'uploaded' if uploaded else 'already there'}, sha256 verified -> {url}")
    # Entry by entry, in order (ids are unique, but nothing here depends on that).
    updated = [{**e, "url": p.url} for e, p in zip(entries, done, strict=True)]
    atomic_write_json(manifest, updated)
    write_digests(manifest.parent, config_hash)  # the manifest changed: so do its digests
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
    p.add_argument("--endpoint-url", metavar="URL",
                   help="the S3-compatible server of an s3:// target (MinIO, R2, ...; default: AWS)")
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
            options = {"endpoint_url": args.endpoint_url} if args.endpoint_url else None
            total += len(publish_manifest(path, args.to, args.base_url, video_dir=args.video_dir,
                                          storage_options=options))
            print(f"updated {path}")
    except (SiteError, OSError) as exc:
        print(f"worldplay publish: error: {exc}", file=sys.stderr)
        return 2
    print(f"published {total} videos from {len(paths)} manifest(s)")
    return 0


__all__ = ["PublishError", "Published", "add_publish_command", "publish_manifest", "sha256_file"]
