"""Result directories: atomic creation, lookup of the latest result, digests and staleness checks.

Layout (see experiments/README.md)::

    experiments/results/<name>/<run-id>/   result.json chunks.csv provenance.json config.toml [...] digests.json
    experiments/results/.tmp-<name>-<run-id>/   while a run is in progress (removed on failure)

``run-id`` is ``YYYYMMDDTHHMMSSZ-<first 8 hex of the config hash>``, so run ids sort by time.
A run writes everything into the temporary directory and renames it into place only when it
is complete; an interrupted or failed run leaves nothing behind.

**Tamper evidence.** The last file a run writes is ``digests.json``: the sha256 of every other
file of the folder and the config hash. :func:`verify_result` (called by :func:`check_fresh`, so
by ``experiment check`` and the site's render step) recomputes them and checks that
``result.json``, ``provenance.json`` and the copied ``config.toml`` all resolve to that hash, and
names the first file that differs. Results committed before digests existed are sealed once
with :func:`seal_result` (``worldplay experiment seal``), which refuses unless the folder is
exactly as committed in git. (A digest file guards against edits, not against someone who
rewrites it too; the git history is the record of who did what.)

**Freshness.** A result is fresh when it verifies, its config hash equals the pinned config's,
and its copied ``config.toml`` resolves to the same full config as the pinned file,
``description`` included (the description is not hashed, but the site shows it next to the
numbers).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..files import sha256_file
from ..leftovers import owner_tag
from ..pose import excerpt
from .schema import ExperimentConfig, ExperimentConfigError, load_config

RESULT_FILE = "result.json"
PROVENANCE_FILE = "provenance.json"
CONFIG_COPY = "config.toml"
DIGESTS_FILE = "digests.json"
DIGESTS_FORMAT = "worldplay-result-digests/1"
TMP_PREFIX = ".tmp-"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ResultError(RuntimeError):
    """A result directory is missing, incomplete or inconsistent."""


class DigestError(ResultError):
    """A result folder has no digest manifest, or a file differs from it (edited after the run)."""


class StaleResultError(ResultError):
    """The latest result of an experiment does not match its pinned config (or is missing)."""

    def __init__(self, name: str, message: str):
        self.experiment = name
        super().__init__(f"experiment '{name}': {message}")


def default_experiments_dir() -> Path:
    """``$WORLDPLAY_EXPERIMENTS_DIR``, else ``experiments/`` of this checkout, else of the cwd."""
    env = os.environ.get("WORLDPLAY_EXPERIMENTS_DIR")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parents[2] / "experiments"
    return checkout if checkout.is_dir() else Path.cwd() / "experiments"


def default_results_root(experiments_dir: Path | None = None) -> Path:
    return (experiments_dir or default_experiments_dir()) / "results"


def new_run_id(config_hash: str, now: dt.datetime) -> str:
    return f"{now.astimezone(dt.UTC):%Y%m%dT%H%M%SZ}-{config_hash[:8]}"


@contextlib.contextmanager
def atomic_result_dir(results_root: Path, name: str, run_id: str) -> Iterator[Path]:
    """Yield an empty temporary directory; on a clean exit rename it to
    ``results_root/<name>/<run_id>``, on any exception (KeyboardInterrupt included) delete it."""
    final = results_root / name / run_id
    if final.exists():
        raise ResultError(f"{final} already exists (same experiment, config and second); run again")
    results_root.mkdir(parents=True, exist_ok=True)
    tmp = results_root / f"{TMP_PREFIX}{name}-{run_id}{owner_tag()}"  # the tag: worldplay.leftovers
    tmp.mkdir()
    try:
        yield tmp
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):
            final.parent.rmdir()  # only if empty: earlier results stay
        raise


def result_dirs(results_root: Path, name: str) -> list[Path]:
    """Complete results of ``name`` (directories holding result.json), oldest first."""
    base = results_root / name
    if not base.is_dir():
        return []
    return sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and (p / RESULT_FILE).is_file())


def latest_result(results_root: Path, name: str) -> Path | None:
    dirs = result_dirs(results_root, name)
    return dirs[-1] if dirs else None


def earlier_result_dirs(results_root: Path, config: ExperimentConfig) -> list[Path]:
    """Complete results filed under the experiment's ``earlier_names`` (before a rename), oldest
    first: run ids start with their UTC start time, so they sort across the old names."""
    return sorted((d for old in config.earlier_names for d in result_dirs(results_root, old)), key=lambda d: d.name)


def latest_earlier_result(config: ExperimentConfig, dirs: list[Path]) -> Path | None:
    """The latest of ``dirs`` (earlier-name results, oldest first) whose config hashes as the
    pinned one does: the same measurement, filed under the experiment's old name. Each one looked
    at is verified (:func:`verify_result`), so an edited one is an error, not skipped."""
    for run_dir in reversed(dirs):
        if verify_result(run_dir).config_hash == config.config_hash:
            return run_dir
    return None


#: Fields every result.json has (the runner writes them), with their JSON types.
RESULT_FIELDS: dict[str, tuple[type, ...]] = {
    "experiment": (str,), "kind": (str,), "run_id": (str,), "config_hash": (str,), "complete": (bool,),
    "files": (list,), "summary": (dict,),
}
#: Fields the site reads when present, with their JSON types (None allowed).
OPTIONAL_RESULT_FIELDS: dict[str, tuple[type, ...]] = {
    "description": (str,), "device_class": (str,), "device_name": (str,), "preset": (str,), "weights": (str,),
    "git_commit": (str,), "git_dirty": (bool,), "started_utc": (str,), "finished_utc": (str,),
}
_REWRITE = "it is written by `python -m worldplay experiment run`; restore it from git or re-run the experiment"


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or :class:`ResultError` (unreadable, not JSON, not an object)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultError(f"{path}: unreadable: {exc}; {_REWRITE}") from None
    if not isinstance(data, dict):
        raise ResultError(f"{path}: must hold a JSON object, got {_json_type(data)}; {_REWRITE}")
    return data


_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", bool: "true or false", int: "a number",
               float: "a number", type(None): "null"}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def read_result(result_dir: Path) -> dict[str, Any]:
    """``result.json`` of ``result_dir``, checked for the fields (and their types) that the
    checks and the site rely on: :class:`ResultError` naming the file and the field otherwise."""
    path = result_dir / RESULT_FILE
    data = read_json_object(path)
    for key, types in RESULT_FIELDS.items():
        if key not in data:
            raise ResultError(f"{path}: field '{key}' is missing; {_REWRITE}")
        if not isinstance(data[key], types):
            raise ResultError(f"{path}: field '{key}' must be {_JSON_TYPES[types[0]]}, got "
                              f"{_json_type(data[key])}; {_REWRITE}")
    for key, types in OPTIONAL_RESULT_FIELDS.items():
        if data.get(key) is not None and not isinstance(data[key], types):
            raise ResultError(f"{path}: field '{key}' must be {_JSON_TYPES[types[0]]} or null, got "
                              f"{_json_type(data[key])}; {_REWRITE}")
    if not all(isinstance(f, str) for f in data["files"]):
        raise ResultError(f"{path}: field 'files' must be a list of file names; {_REWRITE}")
    return data


# ------------------------------------------------------------------------------------------
# digests


def _run_files(run_dir: Path) -> list[str]:
    """Every file of a run folder except the digest manifest (relative POSIX paths, sorted);
    :class:`DigestError` for anything that is not a plain file or folder."""
    files = []
    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir).as_posix()
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise DigestError(f"{run_dir}: {rel} is not a plain file; a result folder holds plain files only")
        if path.is_file() and rel != DIGESTS_FILE:
            files.append(rel)
    return files


def write_digests(run_dir: Path, config_hash: str) -> Path:
    """Write ``digests.json``: the sha256 of every other file of ``run_dir`` and the config hash.
    The runner calls it last, inside the atomic run-folder write."""
    from ..media import atomic_write_json

    manifest = {"format": DIGESTS_FORMAT, "config_hash": config_hash,
                "files": {rel: sha256_file(run_dir / rel) for rel in _run_files(run_dir)}}
    return atomic_write_json(run_dir / DIGESTS_FILE, manifest)


def _seal_hint(run_dir: Path) -> str:
    return (f"a result made before digests existed is sealed once with `python -m worldplay experiment seal "
            f"{run_dir.parent.name}` (only while its folder is exactly as committed in git); any other result: "
            "re-run the experiment")


def read_digests(run_dir: Path) -> dict[str, Any]:
    path = run_dir / DIGESTS_FILE
    if not path.is_file():
        raise DigestError(f"{run_dir}: has no digest manifest ({DIGESTS_FILE}), so edits cannot be detected; "
                          f"{_seal_hint(run_dir)}")
    data = read_json_object(path)
    if data.get("format") != DIGESTS_FORMAT:
        raise DigestError(f"{path}: field 'format' must be {DIGESTS_FORMAT!r}; {_seal_hint(run_dir)}")
    if not isinstance(data.get("config_hash"), str) or not _SHA256.match(data["config_hash"]):
        raise DigestError(f"{path}: field 'config_hash' must be 64 hex digits; {_seal_hint(run_dir)}")
    files = data.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, str) and _SHA256.match(v) for v in files.values()):
        raise DigestError(f"{path}: field 'files' must map file names to sha256 hex digests; {_seal_hint(run_dir)}")
    return data


def load_config_copy(run_dir: Path, name: str) -> ExperimentConfig:
    """The run's copied ``config.toml`` resolved as experiment ``name`` (the schema takes the
    name from the file name, so it is read through a temporary ``<name>.toml``)."""
    copy = run_dir / CONFIG_COPY
    with tempfile.TemporaryDirectory(prefix="worldplay-config-copy-") as tmp:
        named = Path(tmp) / f"{name}.toml"
        try:
            named.write_bytes(copy.read_bytes())
        except OSError as exc:
            raise ResultError(f"{copy}: unreadable: {exc}; {_REWRITE}") from None
        try:
            return load_config(named)
        except ExperimentConfigError as exc:
            raise ResultError(f"{copy}: does not load as experiment '{name}': "
                              f"{str(exc).replace(str(named), CONFIG_COPY)}") from None


def verify_result(run_dir: Path, name: str | None = None) -> ExperimentConfig:
    """Check a result folder against its digest manifest and itself; return the config its
    ``config.toml`` resolves to.

    Every file must be listed in ``digests.json`` with its sha256 and nothing else may be there;
    ``result.json``, ``provenance.json``, ``config.toml`` and the manifest must name the same config
    hash. :class:`DigestError` / :class:`ResultError` name the first file that differs."""
    name = name or run_dir.parent.name
    digests = read_digests(run_dir)
    listed: dict[str, str] = digests["files"]
    present = _run_files(run_dir)
    for rel in present:
        if rel not in listed:
            raise DigestError(f"{run_dir / rel}: not in {DIGESTS_FILE} (added after the run); remove it, or re-run "
                              "the experiment")
    for rel, expected in listed.items():
        if rel not in present:
            raise DigestError(f"{run_dir / rel}: listed in {DIGESTS_FILE} but missing; restore it from git or re-run "
                              "the experiment")
        if sha256_file(run_dir / rel) != expected:
            raise DigestError(f"{run_dir / rel}: differs from its sha256 in {DIGESTS_FILE} (edited after the run); "
                              f"restore it from git (`git checkout -- {run_dir / rel}`) or re-run the experiment")
    recorded = digests["config_hash"]
    result = read_result(run_dir)
    if result["run_id"] != run_dir.name:  # a copied or renamed run would be shown under another's name
        raise DigestError(f"{run_dir / RESULT_FILE}: names run {excerpt(result['run_id'], 60)!r} but lies in folder "
                          f"{run_dir.name!r} (copied or renamed after the run); restore its folder name or re-run "
                          "the experiment")
    provenance = read_json_object(run_dir / PROVENANCE_FILE)
    copy = load_config_copy(run_dir, name)
    for where, value in ((run_dir / RESULT_FILE, result["config_hash"]),
                         (run_dir / PROVENANCE_FILE, provenance.get("config_hash")),
                         (run_dir / CONFIG_COPY, copy.config_hash)):
        if value != recorded:
            raise DigestError(f"{where}: config hash {str(value)[:12]}... differs from {recorded[:12]}... in "
                              f"{DIGESTS_FILE}; the result is inconsistent: re-run the experiment")
    return copy


def check_fresh(name: str, *, experiments_dir: Path | None = None, results_root: Path | None = None,
                result_dir: Path | None = None) -> Path:
    """The latest result directory of ``name`` if it verifies (:func:`verify_result`) and matches
    the pinned config.

    Raises :class:`StaleResultError` (naming the experiment) when there is no result or the
    pinned ``experiments/<name>.toml`` has changed since: its resolved hash differs, or it
    resolves to a different full config than the run's copy (a changed ``description``). Raises
    :class:`DigestError` / :class:`ResultError` when the result fails verification. The site
    render step calls this for every experiment it shows (``result_dir``: the one it chose, e.g.
    the latest committed result, instead of the latest of all).

    Without a result under ``name``, the latest run filed under one of its ``earlier_names``
    (before a rename) stands in when its config hashes as the pinned one does; the returned
    folder's parent then names the old name.
    """
    experiments_dir = experiments_dir or default_experiments_dir()
    results_root = results_root or default_results_root(experiments_dir)
    config: ExperimentConfig = load_config(experiments_dir / f"{name}.toml")
    latest = result_dir if result_dir is not None else latest_result(results_root, name)
    if latest is None:
        latest = latest_earlier_result(config, earlier_result_dirs(results_root, config))
    if latest is None:
        earlier = f" (nor a run of the same config under its earlier names {list(config.earlier_names)})" \
            if config.earlier_names else ""
        raise StaleResultError(name, f"no result under {results_root / name}{earlier}; run "
                                     f"`python -m worldplay experiment run {name}`")
    filed_as = latest.parent.name
    copy = verify_result(latest, filed_as)
    recorded = copy.config_hash
    if filed_as != name and recorded == config.config_hash:
        # An earlier name's run of the same hashed config: what it measured is what the pinned
        # config measures; its description is the old one (the site says so).
        return latest
    if recorded != config.config_hash:
        raise StaleResultError(
            name,
            f"the latest result {latest.name} was made with config hash {str(recorded)[:12]}..., but "
            f"{experiments_dir / (name + '.toml')} now resolves to {config.config_hash[:12]}...; the "
            f"result is stale. Re-run `python -m worldplay experiment run {name}` (or revert the config).",
        )
    pinned, ran = config.resolved(), copy.resolved()
    changed = sorted(k for k in pinned.keys() | ran.keys() if pinned.get(k) != ran.get(k))
    if changed:
        raise StaleResultError(
            name,
            f"the latest result {latest.name} was made from a config whose {', '.join(changed)} differs from "
            f"{experiments_dir / (name + '.toml')} now (not hashed, but shown with the result); the result is "
            f"stale. Re-run `python -m worldplay experiment run {name}` (or revert the config).",
        )
    return latest


# ------------------------------------------------------------------------------------------
# sealing results committed before digests existed


def _git(args: list[str], cwd: Path) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise ResultError(f"cannot run git ({exc}); sealing needs a git checkout") from None
    if done.returncode != 0:
        raise ResultError(f"{cwd}: `git {' '.join(args)}` failed: {done.stderr.strip() or done.returncode}; "
                          "sealing needs the result inside a git checkout")
    return done.stdout


def seal_result(run_dir: Path, name: str | None = None) -> bool:
    """Write the digest manifest of a result committed before digests existed. Refused
    (:class:`ResultError`) unless every file of the folder is exactly as committed in git (no
    changes, staged or not, nothing untracked or ignored) and the folder is consistent
    (:func:`verify_result` after sealing). Returns False if it was already sealed (and verifies)."""
    run_dir = Path(run_dir).resolve()
    name = name or run_dir.parent.name
    if (run_dir / DIGESTS_FILE).exists():
        verify_result(run_dir, name)
        return False
    tracked = _git(["ls-files", "-z", "--", "."], run_dir).split("\0")
    if not any(tracked):
        raise ResultError(f"{run_dir}: not committed to git; only committed results are sealed (a new run writes "
                          "its own digests)")
    status = _git(["status", "--porcelain", "--ignored", "--untracked-files=all", "--", "."], run_dir)
    if status.strip():
        first = status.strip().splitlines()[0]
        raise ResultError(f"{run_dir}: differs from what is committed in git ({first.strip()!r}"
                          f"{' ...' if len(status.strip().splitlines()) > 1 else ''}); restore it "
                          "(`git checkout -- <folder>`, remove untracked files) before sealing")
    result = read_result(run_dir)
    write_digests(run_dir, result["config_hash"])
    try:
        verify_result(run_dir, name)
    except ResultError:
        (run_dir / DIGESTS_FILE).unlink()  # an inconsistent result is not sealed
        raise
    return True
