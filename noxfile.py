"""One session per job. `nox -s bench docs` is the main job; `nox -s tests` runs the tests.

Torch is pinned through WORLDPLAY_TORCH (default `torch==2.13.0`, which on the CPU-only
machines of this project resolves to a local CPU build; on a CUDA machine pip takes the CUDA
build of the same release).
"""

from __future__ import annotations

import os

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "tests"]

PYTHON = os.environ.get("WORLDPLAY_NOX_PYTHON") or None  # None: the interpreter running nox
TORCH = os.environ.get("WORLDPLAY_TORCH", "torch==2.13.0")


def _install(session: nox.Session, *extras: str) -> None:
    session.install(TORCH)
    spec = f".[{','.join(extras)}]" if extras else "."
    session.install("-e", spec)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The test suite (CPU, tiny preset; parity against diffusers included)."""
    _install(session, "test")
    workers = ["-n", "2"] if os.cpu_count() and os.cpu_count() > 1 else []
    session.run("pytest", *workers, *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.5")
    session.run("ruff", "check", "worldplay", "tests", "noxfile.py", "scripts")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks. The experiment runner arrives with the experiments issue; until then this
    prints how to run the backbone measurement script on a GPU machine."""
    session.log(
        "Experiments (pinned configs, runner, results) arrive in a later issue. "
        "Backbone measurement on a GPU: python scripts/backbone_h100.py"
    )


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """The documentation site. It arrives with the site issue; until then this says so."""
    session.log("The Sphinx site arrives in a later issue; nothing to build yet.")
