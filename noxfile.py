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


# kind -> (GPU experiment, tiny CPU experiment or None)
EXPERIMENTS = {
    "bench": ("bench", "bench-tiny-cpu"),
    "rollouts": ("rollouts-samples", "rollouts-tiny-cpu"),
    "drift": ("drift-bf16-vs-fp32", "drift-tiny-cpu"),
    "parity": ("parity-official", None),
}


def _split_experiments(posargs: list[str]) -> tuple[list[str], list[str]]:
    """``--experiment NAME`` (repeatable) out of the session arguments; the rest passes through."""
    names, rest = [], []
    args = iter(posargs)
    for arg in args:
        if arg == "--experiment":
            names.append(next(args, ""))
        elif arg.startswith("--experiment="):
            names.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    return [n for n in names if n], rest


def _has_cuda(session: nox.Session) -> bool:
    out = session.run("python", "-c", "import torch; print(torch.cuda.is_available())", silent=True)
    return str(out).strip().endswith("True")


def _run_experiments(session: nox.Session, kind: str) -> None:
    """Run the named experiments, or the default one of ``kind``: the GPU experiment where CUDA is
    available, else the tiny CPU one (labelled ``cpu-tiny`` in its result)."""
    _install(session)
    names, rest = _split_experiments(session.posargs)
    if not names:
        gpu, cpu = EXPERIMENTS[kind]
        if _has_cuda(session):
            names = [gpu]
        elif cpu is None:
            session.error(f"{kind} needs a CUDA GPU and the official checkout (--official PATH); "
                          "there is no tiny CPU version")
        else:
            session.log(f"no CUDA GPU: running the tiny CPU experiment {cpu} (results labelled cpu-tiny)")
            names = [cpu]
    for name in names:
        session.run("python", "-m", "worldplay", "experiment", "run", name, *rest)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks: bench on a CUDA machine, bench-tiny-cpu otherwise.
    ``nox -s bench -- --experiment NAME [--official PATH] [--allow-dirty] ...``"""
    _run_experiments(session, "bench")


@nox.session(python=PYTHON)
def rollouts(session: nox.Session) -> None:
    """Sample videos (MP4s under runs/videos/, never committed) with per-chunk stats and
    video-manifest entries. Needs the sample inputs: set WORLDPLAY_DATA_DIR offline."""
    _run_experiments(session, "rollouts")


@nox.session(python=PYTHON)
def drift(session: nox.Session) -> None:
    """Drift studies: per-chunk |delta| between two legs (bf16 vs float32 by default)."""
    _run_experiments(session, "drift")


@nox.session(python=PYTHON)
def parity(session: nox.Session) -> None:
    """Native vs the official code with identical weights (CUDA and --official PATH required)."""
    _run_experiments(session, "parity")


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """The documentation site, from the committed results only (no GPU, no network).

    1. ``python -m worldplay.site render``: docs/generated/ (pages, SVG charts, tables, gallery);
       a stale result, or a missing one that docs/site.toml requires, fails here and names it;
    2. ``sphinx-build -W --keep-going -n`` from scratch: any warning fails the build;
    3. tests/test_site_browser.py against that build in headless Chromium (console errors,
       charts, tables, gallery cards); screenshot: docs/_build/screenshots/model_card.png.
       Without Chromium the check is skipped unless WORLDPLAY_REQUIRE_BROWSER=1 (CI sets it).
    """
    import shutil
    from pathlib import Path

    _install(session, "docs")
    session.install("pytest>=8")
    session.run("python", "-m", "worldplay.site", "render")
    shutil.rmtree("docs/_build", ignore_errors=True)  # a full build: no warning hides in a cache
    session.run("sphinx-build", "-W", "--keep-going", "-n", "-b", "html", "docs", "docs/_build/html")
    html = Path("docs/_build/html").resolve()
    session.run("pytest", "-q", "tests/test_site_browser.py", *session.posargs,
                env={"WORLDPLAY_SITE_DIR": str(html),
                     "WORLDPLAY_SCREENSHOT": str(html.parent / "screenshots" / "model_card.png")})
    session.log(f"site: {html / 'index.html'}")
