"""Run one pinned experiment into an atomic result directory.

Before any model work: the config is validated, the git tree is checked (a dirty tree is
refused unless ``allow_dirty``, and then recorded as dirty), the device is checked, and an
official leg without an official checkout is refused (unless ``skip_official``, which reports
that leg as skipped in a bench). Then the kind runs inside a temporary result directory, which
becomes ``<results-root>/<name>/<run-id>/`` only once every file is written:

* ``result.json``: summary numbers (and ``config_hash``, ``device_class``, times);
* ``chunks.csv``: per chunk rows (per leg and stage for benches, per comparison for drift and
  parity, per video and stage for rollouts);
* ``frames.csv`` (drift, parity): per-frame differences; ``videos.json`` (rollouts);
* ``provenance.json``: resolved config and hash, git commit and dirty flag, environment,
  weights identity, inputs, command line, start/end time, host;
* ``config.toml``: a verbatim copy of the pinned config as it was read at the start;
* ``digests.json``, written last: the sha256 of every other file and the config hash, so that
  ``experiment check`` and the site detect any later edit (:func:`~.results.verify_result`).

The temporary folders (``.tmp-*`` result and video staging, the ``worldplay-*`` scratch folder)
carry their owner's tag (:mod:`worldplay.leftovers`). Ctrl-C and SIGTERM remove them on the way
out; what a SIGKILL left is removed by the next run's start, and reported by ``experiment check``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import leftovers
from ..interrupts import sigterm_raises
from ..media import atomic_write_json, atomic_write_text
from .context import KindOutput, RunContext
from .inputs import InputManifest
from .provenance import environment, git_state, iso, utc_now
from .results import (
    CONFIG_COPY,
    PROVENANCE_FILE,
    RESULT_FILE,
    TMP_PREFIX,
    atomic_result_dir,
    default_experiments_dir,
    default_results_root,
    new_run_id,
    write_digests,
)
from .schema import OFFICIAL_LEG, ExperimentConfig, load_config

log = logging.getLogger(__name__)

MANIFEST_FILE = "inputs.toml"
DEFAULT_VIDEO_DIR = Path("runs") / "videos"


class RunRefused(RuntimeError):
    """The run cannot start as asked; nothing was computed or written."""


@dataclass(frozen=True)
class RunOptions:
    official: str | None = None  # official checkout (else $WORLDPLAY_OFFICIAL)
    skip_official: bool = False
    allow_dirty: bool = False
    source_commit: str | None = None  # declared commit where the tree has no .git (GPU machines)
    video_dir: Path = DEFAULT_VIDEO_DIR
    results_root: Path | None = None
    experiments_dir: Path | None = None
    scratch_dir: Path | None = None
    progress: bool = True


def load_experiment(name: str, experiments_dir: Path) -> tuple[ExperimentConfig, InputManifest, bytes]:
    """The validated config, the input manifest and the config file's exact bytes."""
    manifest = InputManifest.load(experiments_dir / MANIFEST_FILE)
    path = experiments_dir / f"{name}.toml"
    config = load_config(path, input_ids=manifest.kinds())
    return config, manifest, path.read_bytes()


def source_state(options: RunOptions) -> dict[str, Any]:
    """The git state to record, or :class:`RunRefused` for a dirty/unknown tree."""
    state = git_state()
    if state is None:
        if options.source_commit:
            return {"commit": options.source_commit, "dirty": None, "source": "declared (--source-commit)"}
        if options.allow_dirty:
            return {"commit": None, "dirty": None, "source": "unknown (no git checkout, --allow-dirty)"}
        raise RunRefused("this tree has no git metadata; pass --source-commit SHA (the commit it was copied "
                         "from, with no local changes) or --allow-dirty")
    if state["dirty"] and not options.allow_dirty:
        shown = ", ".join(state["changed"][:5]) + (" ..." if len(state["changed"]) > 5 else "")
        raise RunRefused(f"the git tree has uncommitted changes ({shown}); commit them first, or pass "
                         "--allow-dirty (the result then records dirty=true)")
    if options.source_commit and options.source_commit != state["commit"]:
        raise RunRefused(f"--source-commit {options.source_commit} differs from HEAD {state['commit']}")
    return state


def _device(config: ExperimentConfig):
    import torch

    if config.device == "cuda" and not torch.cuda.is_available():
        raise RunRefused(f"experiment '{config.name}' runs on CUDA but no GPU is visible; on a CPU-only machine "
                         "run the *-tiny-cpu experiments")
    return torch.device(config.device)


# Why a bench's official leg did not run, as its result and the site report it.
SKIPPED_BY_FLAG = "--skip-official: no official checkout on this run"
SKIPPED_NO_CHECKOUT = ("no official checkout on this machine (no --official PATH, no $WORLDPLAY_OFFICIAL); the "
                       "published side-by-side keeps its own run. Prepare one with `bash scripts/prepare_official.sh "
                       ".official` (it prints the bench command with --official)")


def _check_official(config: ExperimentConfig, options: RunOptions) -> tuple[Path | None, str | None]:
    """(the official checkout, None) or (None, why the official leg is skipped). A bench without a
    checkout runs its native legs and reports the official one as skipped: the README's main
    command must work on any GPU machine. A parity run cannot do without it."""
    from .official_leg import check_can_run, official_root

    root = official_root(options.official)
    if not config.needs_official:
        return root, None
    if options.skip_official:
        if config.kind != "bench":
            raise RunRefused(f"experiment '{config.name}' ({config.kind}) compares against the official leg; "
                             "--skip-official applies only to benches")
        return None, SKIPPED_BY_FLAG
    if root is None and config.kind == "bench":
        log.warning("experiment '%s': the official leg is skipped: %s", config.name, SKIPPED_NO_CHECKOUT)
        return None, SKIPPED_NO_CHECKOUT
    check_can_run(config.name, root)
    return root, None


@contextlib.contextmanager
def _video_staging(video_root: Path, name: str, run_id: str) -> Iterator[tuple[Path, Path]]:
    """(staging folder, final folder); the staging folder is deleted if the run fails."""
    staging = video_root / f"{TMP_PREFIX}{name}-{run_id}{leftovers.owner_tag()}"
    try:
        yield staging, video_root / name / run_id
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def remove_leftovers(results_root: Path, video_dir: Path, scratch_parent: Path | None) -> list[Path]:
    """Remove what runs killed before they could clean up left behind: ``.tmp-*`` result and
    video folders, partial files and scratch folders whose owning process is gone (a running
    run's are kept; see :mod:`worldplay.leftovers`)."""
    removed = leftovers.remove_stale([results_root, video_dir])
    scratch = scratch_parent if scratch_parent is not None else Path(tempfile.gettempdir())
    return removed + leftovers.remove_stale([scratch], prefix=leftovers.SCRATCH_PREFIX)


def run_experiment(name: str, options: RunOptions = RunOptions()) -> Path:
    """Run experiment ``name`` and return its result directory. SIGTERM is handled like Ctrl-C
    (the temporary folders are removed, then :class:`~worldplay.interrupts.Terminated` propagates)."""
    with sigterm_raises():
        return _run_experiment(name, options)


def _run_experiment(name: str, options: RunOptions) -> Path:
    experiments_dir = options.experiments_dir or default_experiments_dir()
    results_root = options.results_root or default_results_root(experiments_dir)
    config, manifest, config_bytes = load_experiment(name, experiments_dir)
    git = source_state(options)
    device = _device(config)
    official_root, official_skipped = _check_official(config, options)
    started = utc_now()
    run_id = new_run_id(config.config_hash, started)
    log.info("experiment %s (%s, %s): run %s", name, config.kind, config.device_class, run_id)

    from .kinds import kind_runner

    scratch_parent = options.scratch_dir
    remove_leftovers(results_root, options.video_dir, scratch_parent)
    if scratch_parent is not None:
        scratch_parent.mkdir(parents=True, exist_ok=True)
    scratch_prefix = f"{leftovers.SCRATCH_PREFIX}{name}{leftovers.owner_tag()}-"
    with (atomic_result_dir(results_root, name, run_id) as out,
          tempfile.TemporaryDirectory(prefix=scratch_prefix, dir=scratch_parent) as scratch,
          _video_staging(options.video_dir, name, run_id) as (video_staging, video_final)):
        ctx = RunContext(config=config, run_id=run_id, device=device, manifest=manifest, scratch=Path(scratch),
                         video_dir=video_staging, official_root=official_root,
                         skip_official=official_skipped is not None,
                         official_skip_reason=official_skipped, progress=options.progress)
        output: KindOutput = kind_runner(config.kind)(ctx)
        finished = utc_now()
        _write_result(out, config, run_id, output, started, finished, git, options, official_root, config_bytes)
        if video_staging.exists():
            video_final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(video_staging, video_final)
    final = results_root / name / run_id
    log.info("wrote %s", final)
    return final


def _write_result(out: Path, config: ExperimentConfig, run_id: str, output: KindOutput, started, finished,
                  git: dict[str, Any], options: RunOptions, official_root: Path | None, config_bytes: bytes) -> None:
    env = environment(config.device)
    files = [RESULT_FILE, "chunks.csv", PROVENANCE_FILE, CONFIG_COPY]
    (out / CONFIG_COPY).write_bytes(config_bytes)
    atomic_write_text(out / "chunks.csv", rows_to_csv(output.chunk_rows))
    if output.frame_rows:
        atomic_write_text(out / "frames.csv", rows_to_csv(output.frame_rows))
        files.append("frames.csv")
    if output.videos:
        atomic_write_json(out / "videos.json", output.videos)
        files.append("videos.json")
    for rel, data in sorted(output.files.items()):
        target = out / rel
        if rel in files or not target.resolve().is_relative_to(out.resolve()):  # a kind's bug, not user input
            raise ValueError(f"result file {rel!r} clashes with another or lands outside the result folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        files.append(rel)
    weights = output.provenance.pop("weights", None) or {"describe": config.weights.describe()}
    provenance = {
        "experiment": config.name,
        "run_id": run_id,
        "kind": config.kind,
        "config_hash": config.config_hash,
        "config": config.resolved(),
        "config_file": f"experiments/{config.name}.toml",
        "git": git,
        "command_line": command_line(),
        "cwd": os.getcwd(),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        "official_root": str(official_root) if official_root else None,
        "environment": env,
        "hostname": env["hostname"],
        "weights": weights,
        **output.provenance,
        "started_utc": iso(started),
        "finished_utc": iso(finished),
        "duration_s": round((finished - started).total_seconds(), 3),
    }
    atomic_write_json(out / PROVENANCE_FILE, provenance)
    result = {
        "experiment": config.name,
        "kind": config.kind,
        "description": config.description,
        "run_id": run_id,
        "config_hash": config.config_hash,
        "device_class": config.device_class,
        "device_name": env["device_name"],
        "preset": config.preset,
        "weights": config.weights.describe(),
        "git_commit": git.get("commit"),
        "git_dirty": git.get("dirty"),
        "started_utc": iso(started),
        "finished_utc": iso(finished),
        "complete": True,
        "files": files,
        "summary": output.summary,
    }
    atomic_write_json(out / RESULT_FILE, result)
    write_digests(out, config.config_hash)  # last: it covers every file above


def command_line() -> list[str]:
    """The command as typed (``python -m worldplay ...`` rather than the path of __main__.py)."""
    argv = list(sys.argv)
    if argv and argv[0].endswith("__main__.py"):
        argv[0:1] = ["-m", Path(argv[0]).parent.name]
    return [os.path.basename(sys.executable), *argv]


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    """CSV text with the union of the rows' keys as columns (first-seen order)."""
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()


__all__ = ["OFFICIAL_LEG", "RunOptions", "RunRefused", "remove_leftovers", "run_experiment", "rows_to_csv"]
