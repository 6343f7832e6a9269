"""Pinned experiments: configs (``experiments/<name>.toml``), the runner, and their results.

Data flow (one direction): a pinned config is *run* (GPU for ``wan5b``, CPU for ``tiny``) into
a result directory that appears atomically under ``experiments/results/<name>/<run-id>/``; the
site *renders* committed results only, after :func:`check_fresh` has confirmed that each
result's config hash still matches its pinned config. See ``experiments/README.md``.

Modules: :mod:`.schema` (strict TOML, resolution, hash), :mod:`.inputs` (input manifest),
:mod:`.runner` (runs one experiment), :mod:`.results` (atomic result directories, staleness),
:mod:`.provenance`, :mod:`.flops`, :mod:`.legs` / :mod:`.official_leg` (ways to make a
rollout), :mod:`.compare` (frame and latent differences), :mod:`.kinds` (bench, rollouts,
drift, parity), :mod:`.cli` (``worldplay experiment run|list|check|config``).
"""

from .results import StaleResultError, check_fresh, latest_result
from .schema import ExperimentConfig, ExperimentConfigError, load_config

__all__ = [
    "ExperimentConfig",
    "ExperimentConfigError",
    "StaleResultError",
    "check_fresh",
    "latest_result",
    "load_config",
]
