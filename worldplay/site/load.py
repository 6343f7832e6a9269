"""Committed results -> Python objects and pandas frames, after the staleness check.

:func:`load_site` reads the site config (``docs/site.toml``), every pinned config
(``experiments/<name>.toml``) and the latest result of each. It fails with one
:class:`~worldplay.site.SiteError` listing every problem, each naming its experiment:

* a result whose config hash differs from its pinned config, or whose copied config differs
  from it in the description (stale; any experiment);
* a result that fails its digest check (a file edited after the run, or no digest manifest);
* no result for an experiment the site config lists under ``required``;
* an invalid pinned config, an incomplete or unreadable result, an unknown name in the site
  config.

Experiments that are neither required nor run are kept with ``result = None`` and shown as
"not yet run".

Only *committed* results are shown by default (git says which: ``git ls-files``), so a local run
(``nox -s bench`` on a laptop) never silently replaces the published numbers; with
``include_local`` the latest result of any kind is shown, and a local one is marked
(:attr:`Result.local`) so that the pages put it under a "local, uncommitted run" banner. Outside
a git checkout (a source archive) every result present counts as committed.
"""

from __future__ import annotations

import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..experiments.inputs import InputManifest
from ..experiments.results import (
    CONFIG_COPY,
    PROVENANCE_FILE,
    ResultError,
    StaleResultError,
    check_fresh,
    default_experiments_dir,
    default_results_root,
    earlier_result_dirs,
    read_json_object,
    read_result,
    result_dirs,
    verify_result,
)
from ..experiments.schema import ExperimentConfig, ExperimentConfigError, experiment_names, load_config
from . import TINY_LABEL, SiteError
from .videos import VideoManifestError, load_video_manifest

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SITE_CONFIG = REPO_ROOT / "docs" / "site.toml"
MODEL_CARD_ROLES = {"bench": "bench", "realtime": "bench", "drift": "drift", "fast_modes": "drift", "memory": "bench",
                    "memory_drift": "drift", "parity": "parity", "gallery": "rollouts", "per_input": "per-input"}


@dataclass(frozen=True)
class SiteConfig:
    """``docs/site.toml``: which experiments must be fresh, which feed the model card."""

    required: tuple[str, ...] = ()
    #: role (bench, drift, parity, gallery) -> experiments in order of preference
    model_card: dict[str, tuple[str, ...]] = field(default_factory=dict)
    path: Path | None = None


def load_site_config(path: str | Path | None = None) -> SiteConfig:
    """Read and strictly validate a site config (unknown keys and wrong types are errors)."""
    path = Path(path) if path is not None else DEFAULT_SITE_CONFIG
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SiteError(f"site config {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise SiteError(f"site config {path}: not valid TOML: {exc}") from None

    def names(value: Any, where: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise SiteError(f"site config {path}: {where} must be a list of experiment names")
        if len(set(value)) != len(value):
            raise SiteError(f"site config {path}: {where} names an experiment twice")
        return tuple(value)

    unknown = sorted(set(data) - {"required", "model_card"})
    if unknown:
        raise SiteError(f"site config {path}: unknown key(s) {', '.join(unknown)}; allowed: required, model_card")
    card = data.get("model_card", {})
    if not isinstance(card, dict):
        raise SiteError(f"site config {path}: [model_card] must be a table")
    bad = sorted(set(card) - set(MODEL_CARD_ROLES))
    if bad:
        raise SiteError(f"site config {path}: unknown model_card key(s) {', '.join(bad)}; "
                        f"allowed: {', '.join(MODEL_CARD_ROLES)}")
    return SiteConfig(
        required=names(data.get("required", []), "required"),
        model_card={role: names(card.get(role, []), f"model_card.{role}") for role in MODEL_CARD_ROLES},
        path=path,
    )


@dataclass
class Result:
    """One committed result directory, loaded."""

    name: str
    path: Path
    result: dict[str, Any]
    provenance: dict[str, Any]
    config_text: str
    chunks: pd.DataFrame
    frames: pd.DataFrame | None = None
    videos: list[dict[str, Any]] | None = None
    #: not committed to git: shown only with ``include_local``, under a banner
    local: bool = False
    #: the experiment's earlier name this run was filed under (before a rename), else None
    filed_as: str | None = None

    @property
    def run_id(self) -> str:
        return self.result["run_id"]

    @property
    def config_hash(self) -> str:
        return self.result["config_hash"]

    @property
    def device_class(self) -> str:
        return self.result.get("device_class", "")

    @property
    def device_name(self) -> str:
        return self.result.get("device_name", "")

    @property
    def is_tiny(self) -> bool:
        return self.device_class == "cpu-tiny"

    @property
    def summary(self) -> dict[str, Any]:
        return self.result.get("summary", {})

    @property
    def device_label(self) -> str:
        """``NVIDIA H100 80GB HBM3 (gpu)``, or the CPU name with the tiny label."""
        label = f"{self.device_name} ({self.device_class})"
        return f"{label}, {TINY_LABEL}" if self.is_tiny else label


@dataclass(frozen=True)
class EarlierRun:
    """A run filed under one of an experiment's earlier names: kept and shown as its history."""

    filed_as: str
    path: Path
    result: dict[str, Any]
    same_config: bool  # its config hashes as the pinned one does

    @property
    def run_id(self) -> str:
        return self.result["run_id"]


@dataclass
class Experiment:
    """A pinned experiment and its latest (fresh) result, if any."""

    name: str
    config: ExperimentConfig
    pinned_text: str
    required: bool
    result: Result | None = None
    #: runs filed under the experiment's earlier names, oldest first (each verified)
    history: list[EarlierRun] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def is_tiny(self) -> bool:
        return self.config.device_class == "cpu-tiny"

    @property
    def status(self) -> str:
        return f"fresh ({self.result.run_id})" if self.result else "not yet run"


@dataclass
class Site:
    experiments: dict[str, Experiment]
    config: SiteConfig
    experiments_dir: Path
    results_root: Path
    #: local (uncommitted) result folders left out because ``include_local`` was not asked for
    local_left_out: list[str] = field(default_factory=list)

    def with_results(self, kind: str | None = None) -> list[Experiment]:
        return [e for e in self.experiments.values() if e.result and (kind is None or e.kind == kind)]

    def first_for(self, role: str) -> Experiment | None:
        """The first experiment of ``model_card.<role>`` that has a result."""
        for name in self.config.model_card.get(role, ()):
            exp = self.experiments[name]
            if exp.result is not None:
                return exp
        return None

    def all_for(self, role: str) -> list[Experiment]:
        return [self.experiments[n] for n in self.config.model_card.get(role, ()) if self.experiments[n].result]


def _object_field(data: dict[str, Any], key: str, path: Path) -> None:
    if data.get(key) is not None and not isinstance(data[key], dict):
        raise ResultError(f"{path}: field '{key}' must be a JSON object; it is written by `python -m worldplay "
                          "experiment run`: restore it from git or re-run the experiment")


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # pandas' ParserError is a ValueError
        raise ResultError(f"{path}: not a readable CSV table ({' '.join(str(exc).split())}); it is written by "
                          "`python -m worldplay experiment run`: restore it from git or re-run the experiment") from None


def load_result(name: str, result_dir: Path) -> Result:
    """Read every file of a result directory (those listed in its result.json must exist). The
    folder has been verified (:func:`~worldplay.experiments.results.check_fresh`) before."""
    result = read_result(result_dir)
    if not result.get("complete"):
        raise ResultError(f"{result_dir}: result.json does not say complete=true")
    for file in result.get("files", []):
        if not (result_dir / file).is_file():
            raise ResultError(f"{result_dir}: {file} is listed in result.json but missing")
    for file in (PROVENANCE_FILE, CONFIG_COPY, "chunks.csv"):
        if not (result_dir / file).is_file():
            raise ResultError(f"{result_dir}: {file} is missing")
    frames = _read_csv(result_dir / "frames.csv") if (result_dir / "frames.csv").is_file() else None
    videos = load_video_manifest(result_dir / "videos.json") if (result_dir / "videos.json").is_file() else None
    provenance = read_json_object(result_dir / PROVENANCE_FILE)
    for key in ("environment", "git", "weights", "official", "image", "text"):
        _object_field(provenance, key, result_dir / PROVENANCE_FILE)
    return Result(
        name=name,
        path=result_dir,
        result=result,
        provenance=provenance,
        config_text=(result_dir / CONFIG_COPY).read_text(encoding="utf-8"),
        chunks=_read_csv(result_dir / "chunks.csv"),
        frames=frames,
        videos=videos,
    )


def committed_result_dirs(results_root: Path) -> set[Path] | None:
    """Result folders (``<name>/<run id>``) whose ``result.json`` git tracks, or None when
    ``results_root`` is not in a git work tree (then no result can be told apart as local)."""
    if not results_root.is_dir():
        return None
    try:
        done = subprocess.run(["git", "ls-files", "-z", "--", "."], cwd=results_root, capture_output=True,
                              check=False)
    except OSError:
        return None
    if done.returncode != 0:
        return None
    committed = set()
    for rel in done.stdout.decode("utf-8", "surrogateescape").split("\0"):
        parts = Path(rel).parts
        if len(parts) == 3 and parts[2] == "result.json":
            committed.add((results_root / parts[0] / parts[1]).resolve())
    return committed


def load_site(
    site_config: SiteConfig | str | Path | None = None,
    *,
    experiments_dir: Path | None = None,
    results_root: Path | None = None,
    include_local: bool = False,
) -> Site:
    """Every pinned experiment with its latest result; :class:`SiteError` on any stale or
    missing-but-required result (all problems in one message, each naming its experiment)."""
    config = site_config if isinstance(site_config, SiteConfig) else load_site_config(site_config)
    experiments_dir = Path(experiments_dir or default_experiments_dir())
    results_root = Path(results_root or default_results_root(experiments_dir))
    names = experiment_names(experiments_dir)
    where = config.path or "the site config"
    errors: list[str] = []
    listed = set(config.required) | {n for role in config.model_card.values() for n in role}
    for name in sorted(listed - set(names)):
        errors.append(f"experiment '{name}': named in {where} but there is no {experiments_dir / name}.toml")
    manifest_path = experiments_dir / "inputs.toml"
    input_ids = InputManifest.load(manifest_path).kinds() if manifest_path.is_file() else None
    experiments: dict[str, Experiment] = {}
    committed = committed_result_dirs(results_root)
    left_out: list[str] = []
    for name in names:
        path = experiments_dir / f"{name}.toml"
        try:
            cfg = load_config(path, input_ids=input_ids)
        except ExperimentConfigError as exc:
            errors.append(f"experiment '{name}': invalid pinned config: {exc}")
            continue
        exp = Experiment(name=name, config=cfg, pinned_text=path.read_text(encoding="utf-8"),
                         required=name in config.required)
        experiments[name] = exp
        dirs = result_dirs(results_root, name)
        earlier = earlier_result_dirs(results_root, cfg)
        if committed is not None and not include_local:
            left_out += [f"{name}/{d.name}" for d in dirs if d.resolve() not in committed]
            dirs = [d for d in dirs if d.resolve() in committed]
            earlier = [d for d in earlier if d.resolve() in committed]
        try:
            exp.history = [EarlierRun(d.parent.name, d, read_result(d), verify_result(d).config_hash == cfg.config_hash)
                           for d in earlier]
        except ResultError as exc:  # DigestError included: an edited earlier run is an error too
            errors.append(f"experiment '{name}': {exc}")
            continue
        if not dirs:  # the latest earlier-name run of the same config stands in (check_fresh)
            dirs = [run.path for run in exp.history if run.same_config][-1:]
        if not dirs and (committed is None or include_local):
            if not exp.required:
                continue  # honestly "not yet run"
        elif not dirs:
            if exp.required:
                local = " (only a local, uncommitted one: commit it, or render with --include-local)" \
                    if any(item.startswith(f"{name}/") for item in left_out) else ""
                errors.append(f"experiment '{name}': no result committed under {results_root / name}{local}; run "
                              f"`python -m worldplay experiment run {name}` ({where} lists it as required)")
            continue  # honestly "not yet run"
        try:
            fresh = check_fresh(name, experiments_dir=experiments_dir, results_root=results_root,
                                result_dir=dirs[-1] if dirs else None)
            exp.result = load_result(name, fresh)
            exp.result.local = committed is not None and fresh.resolve() not in committed
            exp.result.filed_as = fresh.parent.name if fresh.parent.name != name else None
        except StaleResultError as exc:
            extra = f" ({where} lists it as required)" if exp.required and "no result" in str(exc) else ""
            errors.append(f"{exc}{extra}")
        except (ResultError, VideoManifestError) as exc:
            errors.append(f"experiment '{name}': {exc}")
    for role, kind in MODEL_CARD_ROLES.items():
        for name in config.model_card.get(role, ()):
            if name in experiments and experiments[name].kind != kind:
                errors.append(f"experiment '{name}': {where} uses it as model_card.{role}, which needs a "
                              f"{kind} experiment, but it is a {experiments[name].kind}")
    if errors:
        raise SiteError("the site cannot be rendered:\n" + "\n".join(f"  - {e}" for e in errors))
    return Site(experiments=experiments, config=config, experiments_dir=experiments_dir, results_root=results_root,
                local_left_out=left_out)


__all__ = [
    "DEFAULT_SITE_CONFIG",
    "EarlierRun",
    "Experiment",
    "Result",
    "Site",
    "SiteConfig",
    "committed_result_dirs",
    "load_result",
    "load_site",
    "load_site_config",
]
