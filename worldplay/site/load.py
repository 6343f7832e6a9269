"""Committed results -> Python objects and pandas frames, after the staleness check.

:func:`load_site` reads the site config (``docs/site.toml``), every pinned config
(``experiments/<name>.toml``) and the latest result of each. It fails with one
:class:`~worldplay.site.SiteError` listing every problem, each naming its experiment:

* a result whose config hash differs from its pinned config (stale; any experiment);
* no result for an experiment the site config lists under ``required``;
* an invalid pinned config, an incomplete or unreadable result, an unknown name in the site
  config.

Experiments that are neither required nor run are kept with ``result = None`` and shown as
"not yet run".
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..experiments.inputs import InputManifest
from ..experiments.results import (
    CONFIG_COPY,
    PROVENANCE_FILE,
    RESULT_FILE,
    ResultError,
    StaleResultError,
    check_fresh,
    default_experiments_dir,
    default_results_root,
    latest_result,
)
from ..experiments.schema import ExperimentConfig, ExperimentConfigError, experiment_names, load_config
from . import TINY_LABEL, SiteError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SITE_CONFIG = REPO_ROOT / "docs" / "site.toml"
MODEL_CARD_ROLES = {"bench": "bench", "realtime": "bench", "drift": "drift", "fast_modes": "drift", "parity": "parity",
                    "gallery": "rollouts"}


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


@dataclass
class Experiment:
    """A pinned experiment and its latest (fresh) result, if any."""

    name: str
    config: ExperimentConfig
    pinned_text: str
    required: bool
    result: Result | None = None

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


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ResultError(f"{path}: unreadable: {exc}") from None


def load_result(name: str, result_dir: Path) -> Result:
    """Read every file of a result directory (those listed in its result.json must exist)."""
    result = _read_json(result_dir / RESULT_FILE)
    if not result.get("complete"):
        raise ResultError(f"{result_dir}: result.json does not say complete=true")
    for file in result.get("files", []):
        if not (result_dir / file).is_file():
            raise ResultError(f"{result_dir}: {file} is listed in result.json but missing")
    for file in (PROVENANCE_FILE, CONFIG_COPY, "chunks.csv"):
        if not (result_dir / file).is_file():
            raise ResultError(f"{result_dir}: {file} is missing")
    frames = pd.read_csv(result_dir / "frames.csv") if (result_dir / "frames.csv").is_file() else None
    videos = _read_json(result_dir / "videos.json") if (result_dir / "videos.json").is_file() else None
    if videos is not None and not isinstance(videos, list):
        raise ResultError(f"{result_dir}: videos.json must hold a list of entries")
    return Result(
        name=name,
        path=result_dir,
        result=result,
        provenance=_read_json(result_dir / PROVENANCE_FILE),
        config_text=(result_dir / CONFIG_COPY).read_text(encoding="utf-8"),
        chunks=pd.read_csv(result_dir / "chunks.csv"),
        frames=frames,
        videos=videos,
    )


def load_site(
    site_config: SiteConfig | str | Path | None = None,
    *,
    experiments_dir: Path | None = None,
    results_root: Path | None = None,
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
        if latest_result(results_root, name) is None and not exp.required:
            continue  # honestly "not yet run"
        try:
            fresh = check_fresh(name, experiments_dir=experiments_dir, results_root=results_root)
            exp.result = load_result(name, fresh)
        except StaleResultError as exc:
            extra = f" ({where} lists it as required)" if exp.required and "no result" in str(exc) else ""
            errors.append(f"{exc}{extra}")
        except ResultError as exc:
            errors.append(f"experiment '{name}': {exc}")
    for role, kind in MODEL_CARD_ROLES.items():
        for name in config.model_card.get(role, ()):
            if name in experiments and experiments[name].kind != kind:
                errors.append(f"experiment '{name}': {where} uses it as model_card.{role}, which needs a "
                              f"{kind} experiment, but it is a {experiments[name].kind}")
    if errors:
        raise SiteError("the site cannot be rendered:\n" + "\n".join(f"  - {e}" for e in errors))
    return Site(experiments=experiments, config=config, experiments_dir=experiments_dir, results_root=results_root)


__all__ = [
    "DEFAULT_SITE_CONFIG",
    "Experiment",
    "Result",
    "Site",
    "SiteConfig",
    "load_result",
    "load_site",
    "load_site_config",
]
