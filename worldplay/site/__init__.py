"""The documentation site's render step: committed results in, Markdown and SVG out.

Data flow (one direction): ``experiments/results/<name>/<run-id>/`` (committed) →
:mod:`.load` (pandas, after :func:`worldplay.experiments.check_fresh`) → :mod:`.charts`
(deterministic SVGs), :mod:`.tables` (MyST tables), :mod:`.gallery` (video cards) →
:mod:`.pages` (one page per experiment, the experiment index and the model-card fragments) →
``docs/generated/`` → ``sphinx-build``. Nothing here needs a GPU or the network.

Text is data: every value from a result, config or manifest becomes Markdown through
:mod:`.text` (one place, escaping everything), and video manifests are read through
:mod:`.videos` (one schema, for render and publish).

``python -m worldplay.site render`` runs it; ``worldplay publish`` (:mod:`.publish`) uploads
the rollout videos and fills their URLs into the committed video manifests. ``docs/site.toml``
says which experiments the site requires (their results must be fresh); every other pinned
experiment is shown if it has a result (which must then be fresh too) and listed as
"not yet run" otherwise.
"""

from __future__ import annotations


class SiteError(RuntimeError):
    """The site cannot be rendered (stale or missing results, a bad URL, a bad site config).

    The message names the experiment (or video) and says what to do.
    """


#: Shown wherever a number or picture of a ``cpu-tiny`` result appears.
TINY_LABEL = "tiny CPU preset — not representative"

__all__ = ["TINY_LABEL", "SiteError"]
