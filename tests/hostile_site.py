"""A site built from hostile strings: the committed results, every free-text value poisoned.

:func:`hostile_experiments` copies a few pinned configs (one of each kind and model-card role)
and their latest committed results into a folder, then

* gives every pinned config (and the run's copied ``config.toml``, so that the result stays
  fresh) a description made of every payload;
* appends a payload to every string in ``result.json``, ``provenance.json``, ``videos.json`` and
  the CSV files that is more than an identifier (leg names, comparison labels, video ids, device
  and host names, versions, commands, dates, ...: dict keys too), the same payload for the same
  string wherever it occurs, so that leg names still match between the summary and chunks.csv;
* sets every payload into the video fields that reach the cards (id, input, pose), and gives one
  video an https URL, so that its card has a ``<video>`` player with a hostile title;
* re-seals each run folder (``digests.json``): the results verify, as a real run of hostile
  data would.

The payloads try every way out of Markdown into HTML that MyST offers (raw HTML inline and as a
block, a newline into a new block, raw-HTML directives in backtick and colon fences, a line break
that only ``str.splitlines`` sees, roles, links, images, autolinks, substitutions, table pipes,
line-start markers, code spans and fences, character references, mathtext for the charts). Each
one that ran would set ``window.__pwned`` or call ``alert``.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PWN = "window.__pwned=(window.__pwned||[]).concat"
PAYLOADS = [
    f'<img src=x onerror="{PWN}(\'img\');alert(1)">',
    f"<script>{PWN}('script')</script>",
    f"\n\n<script>{PWN}('html-block')</script>\n\n",
    f"\n\n```{{raw}} html\n<script>{PWN}('raw-fence')</script>\n```\n\n",
    f"\n:::{{raw}} html\n<script>{PWN}('colon-fence')</script>\n:::\n",
    f"\x1c```{{raw}} html\x1c<script>{PWN}('splitlines')</script>\x1c```\x1c",
    f"\u2028:::{{raw}} html\u2028<img src=x onerror=\"{PWN}('u2028')\">\u2028:::",
    "{eval-rst}`x` {sub-ref}`today` {{ project }} [^1] (target)=",
    "[a link](javascript:alert(1)) ![an image](x.png) <https://example.invalid/auto> <javascript:alert(1)>",
    f"` `` ``` </video><script>{PWN}('code-span')</script> ``",
    "| a | b |\n| --- | --- |\n| c | d |",
    "# heading", "> quote", "- item", "1. item", "+++", "% comment", ":::", "$x^2$ and $$\\frac{1}{0}$$ \\$",
    "&lt;script&gt; &#60;script&#62; &amp;",
    "\t    indented code block\n    more",
    "trailing backslash \\",
]
#: Values that the render logic compares or looks up (not free text): left as they are.
KEEP = {"config_hash", "run_id", "experiment", "kind", "device_class", "status", "sha256", "url", "file",
        "complete", "memory_mode", "test_leg", "reference_leg"}
#: Pinned configs with their latest result (one of each kind and model-card role), plus one never run.
EXPERIMENTS = ["bench", "bench-2gpu", "bench-tiny-cpu", "drift-bf16-vs-fp32", "drift-reuse-fp8-vs-reprefill",
               "parity-official", "rollouts-tiny-cpu", "interactive-tiny-cpu"]
NOT_RUN = ["rollouts-samples"]
SITE_TOML = """required = ["bench", "drift-bf16-vs-fp32", "parity-official", "rollouts-tiny-cpu"]
[model_card]
bench = ["bench"]
realtime = ["bench-2gpu"]
drift = ["drift-bf16-vs-fp32"]
fast_modes = ["drift-reuse-fp8-vs-reprefill"]
parity = ["parity-official"]
gallery = ["rollouts-tiny-cpu"]
"""
DESCRIPTION = "A hostile description: " + " ".join(PAYLOADS)
HOSTED_URL = "https://videos.example.invalid/hostile/v0.mp4?a=1&b=2"
_IDENTIFIER = re.compile(r"[a-z0-9_.]*")


def payload_for(text: str) -> str:
    return PAYLOADS[zlib.crc32(text.encode()) % len(PAYLOADS)]


def poison(text: str) -> str:
    """``text`` with its payload appended, unless it is an identifier, a number or empty."""
    if _IDENTIFIER.fullmatch(text) or text in ("True", "False"):
        return text
    try:
        float(text)
        return text
    except ValueError:
        return text + payload_for(text)


def poison_json(value: Any, key: str | None = None) -> Any:
    if key in KEEP:
        return value
    if isinstance(value, str):
        return poison(value)
    if isinstance(value, list):
        return [poison_json(v) for v in value]
    if isinstance(value, dict):
        return {poison(k) if k not in KEEP else k: poison_json(v, k) for k, v in value.items()}
    return value


def poison_csv(text: str) -> str:
    rows = list(csv.reader(io.StringIO(text)))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(rows[0])
    writer.writerows([poison(cell) for cell in row] for row in rows[1:])
    return out.getvalue()


def _with_description(toml_text: str) -> str:
    """The config text with its (multi-line basic string) description replaced by DESCRIPTION."""
    new = "description = " + json.dumps(DESCRIPTION)  # a JSON string is a valid TOML basic string
    out, n = re.subn(r'^description = """.*?"""$', lambda _: new, toml_text, count=1, flags=re.S | re.M)
    if n == 0:
        out, n = re.subn(r'^description = ".*"$', lambda _: new, toml_text, count=1, flags=re.M)
    assert n == 1, "no description line to replace"
    return out


def hostile_experiments(dst: Path) -> Path:
    """The hostile experiments folder (pinned configs, inputs.toml, results) under ``dst``."""
    from worldplay.experiments.results import (
        earlier_result_dirs,
        latest_earlier_result,
        latest_result,
        write_digests,
    )
    from worldplay.experiments.schema import load_config

    src = ROOT / "experiments"
    experiments = dst / "experiments"
    experiments.mkdir(parents=True)
    shutil.copy(src / "inputs.toml", experiments / "inputs.toml")
    for name in EXPERIMENTS + NOT_RUN:
        (experiments / f"{name}.toml").write_text(_with_description((src / f"{name}.toml").read_text()))
    for name in EXPERIMENTS:
        cfg = load_config(src / f"{name}.toml")
        # a renamed experiment's run stays under its earlier name (and is shown from there)
        run = latest_result(src / "results", name) or latest_earlier_result(cfg, earlier_result_dirs(src / "results", cfg))
        out = experiments / "results" / run.parent.name / run.name
        shutil.copytree(run, out)
        (out / "config.toml").write_text(_with_description((out / "config.toml").read_text()))
        for path in (out / "result.json", out / "provenance.json"):
            path.write_text(json.dumps(poison_json(json.loads(path.read_text()))))
        for path in out.glob("*.csv"):
            path.write_text(poison_csv(path.read_text()))
        videos = out / "videos.json"
        if videos.is_file():
            entries = poison_json(json.loads(videos.read_text()))
            for i, entry in enumerate(entries):
                entry.update({field: f"{field}-{i} " + " ".join(PAYLOADS) for field in ("id", "input", "pose")})
            entries[0]["url"] = HOSTED_URL  # one card with a player: the raw <video> tag, with a hostile title
            videos.write_text(json.dumps(entries))
        write_digests(out, json.loads((out / "result.json").read_text())["config_hash"])
    (dst / "site.toml").write_text(SITE_TOML)
    return experiments


#: The hand-written pages of the hostile site (no API reference: nothing there comes from data).
INDEX_MD = """# hostile

```{toctree}
card
experiments
gallery
```
"""
CARD_MD = "# Card\n\n" + "".join(
    f"## {name}\n\n```{{include}} generated/fragments/model_card_{name}.md\n```\n\n"
    for name in ("trajectories", "performance", "fast_modes", "drift", "parity", "gallery"))


def hostile_docs(dst: Path) -> Path:
    """A Sphinx source folder for the hostile site: the real conf.py, static files, experiments
    and gallery pages, and a small index and card page instead of the API reference."""
    docs = dst / "docs"
    docs.mkdir(parents=True, exist_ok=True)  # generated/ may be there already
    for name in ("conf.py", "experiments.md", "gallery.md"):
        shutil.copy(ROOT / "docs" / name, docs / name)
    shutil.copytree(ROOT / "docs" / "_static", docs / "_static")
    (docs / "index.md").write_text(INDEX_MD)
    (docs / "card.md").write_text(CARD_MD)
    return docs
