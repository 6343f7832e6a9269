"""Result directories: atomic creation, lookup of the latest result, and staleness checks.

Layout (see experiments/README.md)::

    experiments/results/<name>/<run-id>/   result.json chunks.csv provenance.json config.toml [...]
    experiments/results/.tmp-<name>-<run-id>/   while a run is in progress (removed on failure)

``run-id`` is ``YYYYMMDDTHHMMSSZ-<first 8 hex of the config hash>``, so run ids sort by time.
A run writes everything into the temporary directory and renames it into place only when it
is complete; an interrupted or failed run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .schema import ExperimentConfig, load_config

RESULT_FILE = "result.json"
PROVENANCE_FILE = "provenance.json"
CONFIG_COPY = "config.toml"
TMP_PREFIX = ".tmp-"


class ResultError(RuntimeError):
    """A result directory is missing, incomplete or inconsistent."""


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
    tmp = results_root / f"{TMP_PREFIX}{name}-{run_id}"
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


def read_result(result_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((result_dir / RESULT_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ResultError(f"{result_dir}: unreadable {RESULT_FILE}: {exc}") from None


def check_fresh(name: str, *, experiments_dir: Path | None = None, results_root: Path | None = None) -> Path:
    """The latest result directory of ``name`` if its config hash matches the pinned config.

    Raises :class:`StaleResultError` (naming the experiment) when there is no result or the
    pinned ``experiments/<name>.toml`` has changed since (its resolved hash differs). The site
    render step calls this for every experiment it shows.
    """
    experiments_dir = experiments_dir or default_experiments_dir()
    results_root = results_root or default_results_root(experiments_dir)
    config: ExperimentConfig = load_config(experiments_dir / f"{name}.toml")
    latest = latest_result(results_root, name)
    if latest is None:
        raise StaleResultError(name, f"no result under {results_root / name}; run "
                                     f"`python -m worldplay experiment run {name}`")
    recorded = read_result(latest).get("config_hash")
    if recorded != config.config_hash:
        raise StaleResultError(
            name,
            f"the latest result {latest.name} was made with config hash {str(recorded)[:12]}..., but "
            f"{experiments_dir / (name + '.toml')} now resolves to {config.config_hash[:12]}...; the "
            f"result is stale. Re-run `python -m worldplay experiment run {name}` (or revert the config).",
        )
    return latest
