"""``python -m worldplay.site render``: committed results -> ``docs/generated/``.

Exit status 0 on success; 1 with one message per problem (each naming its experiment or video)
when a result is stale, a required one is missing, fails its digest check, or a manifest URL is
not https; 2 when ``--out`` names a folder that render did not make (it would be replaced).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import SiteError
from .load import DEFAULT_SITE_CONFIG, REPO_ROOT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m worldplay.site", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("render", help="render the generated pages and charts from the committed results")
    r.add_argument("--site-config", type=Path, default=DEFAULT_SITE_CONFIG,
                   help="which experiments the site requires and which feed the model card (default: docs/site.toml)")
    r.add_argument("--experiments-dir", type=Path, default=None,
                   help="folder of the pinned configs (default: experiments/ of this checkout)")
    r.add_argument("--results-root", type=Path, default=None,
                   help="committed results (default: <experiments-dir>/results)")
    r.add_argument("--include-local", action="store_true",
                   help="also show results not committed to git (a local run), each under a 'local, uncommitted "
                        "run' banner; by default only committed results are rendered")
    r.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "generated",
                   help="output folder, replaced as a whole: it must be new, empty or an earlier render "
                        "(default: docs/generated)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .load import load_site
    from .pages import OutputFolderRefused, check_output_folder, render_site

    try:
        check_output_folder(args.out)  # before any work: a wrong --out is a usage error
        site = load_site(args.site_config, experiments_dir=args.experiments_dir, results_root=args.results_root,
                         include_local=args.include_local)
        files = render_site(site, args.out)
    except OutputFolderRefused as exc:
        print(f"worldplay.site render: error: {exc}", file=sys.stderr)
        return 2
    except SiteError as exc:
        print(f"worldplay.site render: error: {exc}", file=sys.stderr)
        return 1
    shown = sum(1 for e in site.experiments.values() if e.result)
    print(f"rendered {len(files)} files into {args.out} ({shown} experiments with results, "
          f"{len(site.experiments) - shown} not yet run)")
    if site.local_left_out:
        print(f"left out {len(site.local_left_out)} local uncommitted result(s) ({', '.join(site.local_left_out)}); "
              "pass --include-local to show them under a banner")
    return 0


if __name__ == "__main__":
    sys.exit(main())
