"""One module per experiment kind; each has ``run(ctx: RunContext) -> KindOutput``."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from ..schema import KINDS


def kind_runner(kind: str) -> Callable:
    if kind not in KINDS:
        raise ValueError(f"unknown experiment kind {kind!r}; choose one of {list(KINDS)}")
    return importlib.import_module(f"{__name__}.{kind.replace('-', '_')}").run  # per-input -> per_input
