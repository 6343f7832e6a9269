"""``worldplay experiment run | list | check | seal | config`` (hooked into ``worldplay.cli``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def add_experiment_commands(sub) -> None:
    p = sub.add_parser("experiment", help="run, list and check the pinned experiments (experiments/*.toml)",
                       description="Pinned experiments: see experiments/README.md.")
    p.add_argument("--experiments-dir", type=Path, default=None,
                   help="folder of the pinned configs (default: experiments/ of this checkout)")
    p.add_argument("--results-root", type=Path, default=None,
                   help="where results go / are read (default: <experiments-dir>/results)")
    esub = p.add_subparsers(dest="experiment_command", required=True)

    r = esub.add_parser("run", help="run one or more experiments into new result directories")
    r.add_argument("names", nargs="+", metavar="NAME", help="experiment names (experiments/NAME.toml)")
    r.add_argument("--official", help="official HY-WorldPlay checkout for official legs (else $WORLDPLAY_OFFICIAL)")
    r.add_argument("--skip-official", action="store_true",
                   help="benches: report the official leg as skipped instead of failing without --official")
    r.add_argument("--allow-dirty", action="store_true",
                   help="run from a tree with uncommitted changes (recorded as dirty=true)")
    r.add_argument("--source-commit", help="the commit this tree was copied from, where it has no .git "
                                           "(the GPU machines); recorded as declared")
    r.add_argument("--video-dir", type=Path, default=Path("runs") / "videos",
                   help="where rollout videos go (default: runs/videos, git-ignored)")
    r.add_argument("--scratch-dir", type=Path, default=None,
                   help="temporary working space, e.g. for exported official-leg weights (default: $TMPDIR)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.set_defaults(func=cmd_run)

    ls = esub.add_parser("list", help="list the pinned experiments with their hash and latest result")
    ls.set_defaults(func=cmd_list)

    c = esub.add_parser("check", help="exit non-zero unless every named (default: every) experiment's "
                                      "latest result verifies against its digests and matches its pinned config")
    c.add_argument("names", nargs="*", metavar="NAME")
    c.set_defaults(func=cmd_check)

    se = esub.add_parser("seal", help="write the digest manifest of results committed before digests existed "
                                      "(refused unless the result folder is exactly as committed in git)")
    se.add_argument("names", nargs="*", metavar="NAME", help="experiments whose results to seal (every run folder)")
    se.add_argument("--all", action="store_true", help="every result of every pinned experiment")
    se.set_defaults(func=cmd_seal)

    s = esub.add_parser("config", help="print an experiment's resolved config and hash")
    s.add_argument("name", metavar="NAME")
    s.set_defaults(func=cmd_config)


def _dirs(args) -> tuple[Path, Path]:
    from .results import default_experiments_dir, default_results_root

    experiments_dir = args.experiments_dir or default_experiments_dir()
    return experiments_dir, args.results_root or default_results_root(experiments_dir)


def _errors() -> tuple[type[BaseException], ...]:
    from ..pose import PoseError
    from .inputs import InputError
    from .official_leg import OfficialLegUnavailable
    from .results import ResultError
    from .runner import RunRefused
    from .schema import ExperimentConfigError

    return (ExperimentConfigError, InputError, ResultError, RunRefused, OfficialLegUnavailable, PoseError)


def _guarded(fn):
    def wrapper(args) -> int:
        try:
            return fn(args)
        except _errors() as exc:
            print(f"worldplay experiment: error: {exc}", file=sys.stderr)
            return 2

    return wrapper


@_guarded
def cmd_run(args) -> int:
    from .runner import RunOptions, run_experiment

    experiments_dir, results_root = _dirs(args)
    options = RunOptions(official=args.official, skip_official=args.skip_official, allow_dirty=args.allow_dirty,
                         source_commit=args.source_commit, video_dir=args.video_dir, results_root=results_root,
                         experiments_dir=experiments_dir, scratch_dir=args.scratch_dir,
                         progress=not args.no_progress)
    for name in args.names:
        path = run_experiment(name, options)
        print(f"{name}: wrote {path}")
    return 0


@_guarded
def cmd_list(args) -> int:
    from .inputs import InputManifest
    from .results import ResultError, StaleResultError, check_fresh, latest_result
    from .schema import ExperimentConfigError, experiment_names, load_config

    experiments_dir, results_root = _dirs(args)
    manifest = InputManifest.load(experiments_dir / "inputs.toml")
    bad = 0
    print(f"{'name':28} {'kind':9} {'class':9} {'hash':12} latest result")
    for name in experiment_names(experiments_dir):
        try:
            cfg = load_config(experiments_dir / f"{name}.toml", input_ids=manifest.kinds())
        except ExperimentConfigError as exc:
            print(f"{name:28} INVALID: {exc}")
            bad += 1
            continue
        latest = latest_result(results_root, name)
        if latest is None:
            state = "none"
        else:
            try:  # the same verdict as `check` (digests, hash, description)
                check_fresh(name, experiments_dir=experiments_dir, results_root=results_root)
                state = f"{latest.name} (fresh)"
            except ResultError as exc:
                state = f"{latest.name} ({'STALE' if isinstance(exc, StaleResultError) else 'UNVERIFIED'})"
        print(f"{name:28} {cfg.kind:9} {cfg.device_class:9} {cfg.config_hash[:12]} {state}")
    report_leftovers(results_root)
    return 1 if bad else 0


def report_leftovers(results_root: Path, video_dir: Path | None = None) -> int:
    """Print to stderr the temporary folders and partial files in the results and video folders
    (runs in progress, or killed ones that the next ``experiment run`` removes); return how many.
    They are never results, so they do not change any command's exit status."""
    from .. import leftovers
    from .runner import DEFAULT_VIDEO_DIR

    found = leftovers.find(results_root) + leftovers.find(video_dir or DEFAULT_VIDEO_DIR)
    for item in found:
        print(f"leftover: {item.describe()}", file=sys.stderr)
    return len(found)


@_guarded
def cmd_check(args) -> int:
    """Exit 0 when every result is fresh and verifies; 1 when any is stale, missing, unsealed or
    fails its digests (one line each, naming the experiment and the file)."""
    from .results import ResultError, StaleResultError, check_fresh
    from .schema import experiment_names

    experiments_dir, results_root = _dirs(args)
    names = args.names or experiment_names(experiments_dir)
    failed = 0
    for name in names:
        try:
            path = check_fresh(name, experiments_dir=experiments_dir, results_root=results_root)
            print(f"{name}: fresh ({path})")
        except StaleResultError as exc:
            print(f"{exc}", file=sys.stderr)
            failed += 1
        except ResultError as exc:
            print(f"experiment '{name}': {exc}", file=sys.stderr)
            failed += 1
    report_leftovers(results_root)
    return 1 if failed else 0


@_guarded
def cmd_seal(args) -> int:
    """Seal every result folder of the named experiments (or ``--all``); exit 2 if any is refused."""
    from .results import ResultError, result_dirs, seal_result
    from .schema import experiment_names

    experiments_dir, results_root = _dirs(args)
    if bool(args.names) == bool(args.all):
        print("worldplay experiment seal: error: name the experiments to seal, or pass --all (not both)",
              file=sys.stderr)
        return 2
    names = experiment_names(experiments_dir) if args.all else args.names
    refused = 0
    for name in names:
        dirs = result_dirs(results_root, name)
        if not dirs and not args.all:
            print(f"experiment '{name}': no result under {results_root / name}", file=sys.stderr)
            refused += 1
        for run_dir in dirs:
            try:
                print(f"{name}: {'sealed' if seal_result(run_dir, name) else 'already sealed'} {run_dir}")
            except ResultError as exc:
                print(f"experiment '{name}': not sealed: {exc}", file=sys.stderr)
                refused += 1
    return 2 if refused else 0


@_guarded
def cmd_config(args) -> int:
    from .runner import load_experiment

    experiments_dir, _ = _dirs(args)
    cfg, _, _ = load_experiment(args.name, experiments_dir)
    print(json.dumps({"name": cfg.name, "config_hash": cfg.config_hash, "device_class": cfg.device_class,
                      "resolved": cfg.resolved()}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m worldplay.experiments.cli ...``) for tests and tools."""
    parser = argparse.ArgumentParser(prog="worldplay")
    add_experiment_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["experiment", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from ..interrupts import report_interrupt, sigterm_raises

    try:
        with sigterm_raises():
            return args.func(args)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM: the run removed its temporary folders
        return report_interrupt("worldplay experiment", exc)


if __name__ == "__main__":
    sys.exit(main())
