"""Generated Markdown: one page per pinned experiment, the experiment index, and the fragments
that the hand-written pages (``docs/model_card.md``, ``docs/gallery.md``, ``docs/experiments.md``)
include.

Output layout (``docs/generated/``, git-ignored, rebuilt by ``nox -s docs``)::

    experiments/<name>.md        one page per pinned experiment (run or not yet run)
    charts/*.svg                 every chart (deterministic bytes)
    fragments/*.md               included by the hand-written pages

Charts and cross-references use source-root paths (``/generated/...``), so a fragment renders
the same wherever it is included.

Every value from a result, a config or a manifest reaches the Markdown through
:mod:`worldplay.site.text` (:func:`~worldplay.site.text.md`, ``escape``, ``code``, ...): the
templates here are the only markup, and a page is :class:`~worldplay.site.text.Markdown` end to
end (``render_site`` refuses anything else).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..constants import CHUNK_LATENTS as LATENTS_PER_CHUNK
from ..experiments.leg_table import LEG_TABLE, PIPELINED, intro_of
from ..pose import load_trajectory
from . import TINY_LABEL, SiteError, charts, per_input
from .cards import card_table
from .gallery import VideoCard, cards_from_manifest, gallery_markdown, planned_cards
from .load import Experiment, Result, Site
from .tables import key_value_table, markdown_table
from .text import Markdown, bibtex_value, code, code_block, escape, join, md, option

M = Markdown  # markup written here (trusted); everything else is escaped

FRAMES_PER_CHUNK = 16  # steady chunks; chunk 0 has 13
GENERATED = "generated"  # the output folder's path below the Sphinx source root


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def ms(x: Any) -> str:
    """Milliseconds for a table: 3 significant digits below 100 ms, whole ms above."""
    if x is None or (isinstance(x, float) and x != x):
        return "—"
    x = float(x)
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _num(x: Any, fmt: str = "{:.4g}") -> str:
    return "—" if x is None else fmt.format(x)


def tiny_admonition(what: str = "These results") -> Markdown:
    return md(":::{{admonition}} {}\n:class: warning wp-tiny\n\n{} come from the `tiny` preset on a "
              "CPU: they show that the harness works, not how the real model behaves or performs.\n:::\n",
              TINY_LABEL, what)


def weights_note(res: Result) -> str:
    """``, random weights (...)`` for a result run with seeded random weights, else empty: a drift
    or parity number of random weights says nothing about the pictures of the real ones."""
    weights = str(res.result.get("weights") or "")
    return ", seeded random weights of the real architecture" if "random" in weights else ""


def card_summary(site: Site) -> Markdown:
    """The model card's opening: what was measured, how fast on which card (the card named by
    the result's own provenance), and what is not measured yet."""
    out = []
    exp = site.first_for("bench")
    if exp is None:
        out.append(M("- **Speed:** no benchmark result is committed yet.\n"))
    else:
        res = exp.result
        legs = res.summary.get("legs", {})

        def fps(leg: str) -> float | None:
            total = ((legs.get(leg) or {}).get("steady_ms") or {}).get("total", {}).get("median")
            return FRAMES_PER_CHUNK / (total / 1000) if total else None

        fast, eager = fps("native-fastest"), fps("native-eager")
        where = md("on **{}** ({}, run {}{})", res.device_name or "an unnamed device", res.device_class,
                   code(res.run_id), md(", filed as {}", code(res.filed_as)) if res.filed_as else M(""))
        if fast is not None:
            eager_text = md(" ({} frames/s eager)", f"{eager:.1f}") if eager else M("")
            out.append(md("- **Speed:** {} frames/s in the steady state with the fastest exact settings{} {}, at {}×{} "
                          "({}).\n", f"{fast:.1f}", eager_text, where, *exp.config.resolution, Renderer.doc_link(exp.name)))
        official = legs.get("official")
        if official and official.get("status") != "ok":
            out.append(md("- **Official code:** not run in this bench ({}).\n", official.get("reason", "")))
        if res.is_tiny:
            out.append(md("- **{}:** these speeds come from the tiny preset on a CPU and say nothing about the real "
                          "model.\n", TINY_LABEL))
        if res.local:
            out.append(M("- **Local, uncommitted run:** the speed above is from this machine, not a published result.\n"))
        if high_variance_legs(res):
            out.append(M("- **High variance:** some legs of this run spread widely; see the note under Performance.\n"))
    out.append(M("- **Measured:** time per stage and chunk, peak memory, the drift of every fast mode against the exact "
                 "pipeline, and parity with the official code on the same weights; all with **seeded random weights of "
                 "the real architecture** (the timings are real, the frames are noise).\n"))
    hosted = [e for e in site.with_results("rollouts") for v in (e.result.videos or []) if v.get("url")]
    videos = (M("sample videos of the real weights are hosted (see the gallery)") if hosted
              else M("**no hosted videos yet**: the gallery shows the planned ones"))
    out.append(md("- **Not measured yet:** the picture quality of the published weights; {}.\n", videos))
    return join("", out)


def result_banners(res: Result) -> list[Markdown]:
    """The banners a shown result needs: not committed to git; filed under an earlier name."""
    return [b for b, shown in ((local_banner(res), res.local), (earlier_name_banner(res), res.filed_as)) if shown]


def earlier_name_banner(res: Result) -> Markdown:
    """The banner of a run filed under the experiment's earlier name (before a rename)."""
    return md(":::{{admonition}} Earlier run, filed as {}\n:class: note wp-earlier\n\n{} has no run under its current "
              "name yet. Run {} was made before the experiment was renamed, under its earlier name {}, with a config "
              "that hashes as the pinned one does (the same measurement); it ran on **{}**. Its own description and "
              "config file (below) are the ones of that time. Re-run {} to measure it on the card at hand.\n:::\n",
              code(res.filed_as), code(res.name), code(res.run_id), code(res.filed_as),
              res.device_name or "an unnamed device", code(f"python -m worldplay experiment run {res.name}"))


def earlier_runs_table(exp: Experiment) -> Markdown:
    """Every run filed under the experiment's earlier names: its history, each with its card."""
    if not exp.history:
        return M("")
    shown = exp.result.path if exp.result else None
    rows = [{"run": code(run.run_id), "filed as": code(run.filed_as),
             "card": run.result.get("device_name") or "—", "device class": run.result.get("device_class") or "—",
             "started (UTC)": run.result.get("started_utc") or "—",
             "config": "same as pinned" if run.same_config else md("different ({})", code(run.result["config_hash"][:12])),
             "shown on this page": "yes" if run.path == shown else "no"}
            for run in reversed(exp.history)]
    return join("\n", [M("## Earlier runs\n"),
                       md("Runs filed under this experiment's earlier names ({}), newest first, kept as its history. "
                          "Each was made on the card it names; a run of a different config measured something else "
                          "and is listed only.\n", join(", ", [code(n) for n in exp.config.earlier_names])),
                       markdown_table(rows, caption="Earlier runs", align={"started (UTC)": "l"})])


def local_banner(res: Result) -> Markdown:
    """The banner of a result that git does not hold (``render --include-local``)."""
    return md(":::{{admonition}} Local, uncommitted run\n:class: danger wp-local\n\nRun {} is not committed to git: "
              "it is shown because the site was rendered with {}. It is a measurement of the machine it ran on, "
              "not a published result; commit it (or render without the flag) before publishing.\n:::\n",
              code(res.run_id), code("--include-local"))


# A leg whose steady chunk times spread this much (p90 / median of the total) ran on a busy or
# throttled machine: its median is not a dependable number, and the page says so.
HIGH_VARIANCE_RATIO = 1.5


def high_variance_legs(res: Result) -> dict[str, float]:
    """leg -> p90/median of its steady total time, for the legs above :data:`~worldplay.site.pages.HIGH_VARIANCE_RATIO`."""
    noisy = {}
    for name, leg in res.summary.get("legs", {}).items():
        total = (leg.get("steady_ms") or {}).get("total") or {}
        median, p90 = total.get("median"), total.get("p90")
        if leg.get("status") == "ok" and median and p90 and p90 / median > HIGH_VARIANCE_RATIO:
            noisy[name] = p90 / median
    return noisy


def variance_note(res: Result) -> Markdown:
    """A visible note naming the high-variance legs of a bench result (empty when there are none)."""
    noisy = high_variance_legs(res)
    if not noisy:
        return M("")
    legs = join(", ", [md("{} (p90 {}× the median)", code(name), f"{ratio:.1f}") for name, ratio in noisy.items()])
    return md(":::{{admonition}} High variance\n:class: warning wp-variance\n\nThe steady chunk times of {} spread "
              "widely (p90 more than {}× the median): the machine was probably busy or throttled, so their medians and "
              "the ratios between legs are not dependable. Re-run on an idle machine before reading speed from them."
              "\n:::\n", legs, HIGH_VARIANCE_RATIO)


_SOURCE_PATH = re.compile(r"/[a-z0-9][a-z0-9/._-]*")


def _path(path: str) -> str:
    """A source-root path written into a role or directive, where nothing is escaped: built from
    experiment names and slugs (lower-case letters, digits, '-'), checked here all the same."""
    if not _SOURCE_PATH.fullmatch(path) or ".." in path:
        raise SiteError(f"refusing to write the path {path!r} into a page (letters, digits, '-', '_', '.', '/')")
    return path


def _name(name: str) -> str:
    """An experiment name written into a role or a target (``(name)=``), where nothing is
    escaped: config names are lower-case letters, digits and '-' (the schema checks that)."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        raise SiteError(f"refusing to write the experiment name {name!r} into a link (letters, digits, '-')")
    return name


@dataclass
class Renderer:
    """Writes charts into ``out/charts`` (each once) and returns Markdown."""

    out: Path
    prefix: str = f"/{GENERATED}"
    written: dict[str, Path] = field(default_factory=dict)
    pose_cache: dict[tuple[str, int, int], list[charts.MemoryRow] | None] = field(default_factory=dict)

    # -- building blocks ------------------------------------------------------------------
    def chart(self, name: str, make: Callable[[], Any]) -> str:
        """Source-root path of chart ``name`` (rendered on first use)."""
        src = _path(f"{self.prefix}/charts/{name}.svg")
        if name not in self.written:
            path = self.out / "charts" / f"{name}.svg"
            charts.save_svg(make(), path)
            self.written[name] = path
        return src

    def asset(self, name: str, source: Path) -> str:
        """Source-root path of a committed file (a result's thumbnail) copied to ``out/name`` once."""
        src = _path(f"{self.prefix}/{name}")
        if name not in self.written:
            target = self.out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            self.written[name] = target
        return src

    @staticmethod
    def figure(src: str, caption: Markdown | str, alt: str) -> Markdown:
        return md(":::{{figure}} {}\n:alt: {}\n:width: 100%\n:class: wp-chart\n\n{}\n:::\n",
                  M(_path(src)), M(option(alt)), caption)

    def doc(self, name: str) -> Markdown:
        """A link to the page of experiment ``name`` (a config name: letters, digits, '-')."""
        return self.doc_link(name, self.prefix)

    @staticmethod
    def doc_link(name: str, prefix: str = f"/{GENERATED}") -> Markdown:
        return M(f"{{doc}}`{_name(name)} <{_path(f'{prefix}/experiments/{name}')}>`")

    # -- poses ----------------------------------------------------------------------------
    def memory_rows(self, pose: str, num_chunk: int, seed: int) -> list[charts.MemoryRow] | None:
        key = (pose, num_chunk, seed)
        if key not in self.pose_cache:
            if pose.startswith("input:"):
                self.pose_cache[key] = None
            else:
                traj = load_trajectory(pose).for_chunks(num_chunk)
                self.pose_cache[key] = charts.memory_rows(traj.viewmats, num_chunk, seed)
        return self.pose_cache[key]

    def pose_section(self, pose: str, num_chunk: int, seed: int, recorded: dict[str, dict[str, Any]],
                     level: str = "###", recorded_indices: dict[str, dict[str, list[int]]] | None = None) -> str:
        """Trajectory plot, memory-retrieval map and selection table of one pinned pose."""
        title = md("{} Pose {} ({} chunks)\n\n", M(level), code(pose), num_chunk)
        if pose.startswith("input:"):
            return title + md("The trajectory comes from the input file {} (official sample data, not "
                              "committed), so it is not plotted here.\n", code(pose[6:]))
        slug = f"pose-{_slug(pose)}-{num_chunk}"
        traj = load_trajectory(pose).for_chunks(num_chunk)
        src = self.chart(f"{slug}-trajectory", lambda: charts.trajectory_figure(
            traj.c2w, latents_per_chunk=LATENTS_PER_CHUNK, title=f"pose {pose!r}, {num_chunk} chunks"))
        out = [title, self.figure(
            src, md("Camera trajectory of {} ({} latents, {} chunks) from "
                    "`worldplay.pose.load_trajectory(pose).c2w`: left, the path seen from above (x right, z "
                    "forward) with one heading arrow per latent, coloured by chunk; right, yaw and pitch per "
                    "latent.", code(pose), len(traj), num_chunk),
            f"top-down camera trajectory of pose {pose}")]
        rows = self.memory_rows(pose, num_chunk, seed)
        # The map shows what the run selected (near-ties can differ between devices, so a
        # selection recomputed here could disagree with the GPU run); computed only without one.
        map_rows, source, key = rows, md(
            "computed here with `worldplay.memory_select.select_memory` from the pinned poses and the seeded point "
            "cloud {} (no result records this selection)",
            code(f"memory_point_cloud(generator=torch.Generator().manual_seed({seed}))")), "computed"
        label, indices = next(((k, v) for k, v in (recorded_indices or {}).items() if v), (None, None))
        if indices:
            clips = recorded.get(label, {})
            map_rows = charts.recorded_memory_rows(indices, clips, num_chunk, LATENTS_PER_CHUNK)
            source, key = md("as the run recorded them ({})", code(label.removeprefix("recorded: "))), _slug(label)
        elif recorded:
            label, clips = next(iter(recorded.items()))
            map_rows = charts.memory_rows_from_clips(clips, num_chunk, LATENTS_PER_CHUNK)
            source, key = md("from the retrieved clips the run recorded ({}); the result predates recording the "
                             "attended latents, so they are rebuilt with the selection rule",
                             code(label.removeprefix("recorded: "))), _slug(label) + "-clips"
        src = self.chart(f"{slug}-seed{seed}-memory-{key}", lambda: charts.memory_map(
            map_rows, latents_per_chunk=LATENTS_PER_CHUNK,
            title=f"memory retrieval, pose {pose!r} (cloud seed {seed})"))
        out.append(self.figure(
            src, md("Memory-retrieval map: the latents each chunk attends to, {}. Chunks 1–3 attend to every "
                    "earlier latent; from chunk 4 on, to the 12 most recent plus the 4-latent clip whose frusta "
                    "best overlap the chunk's (lowest score D).", source),
            f"memory retrieval map of pose {pose}"))
        table = []
        for r in rows:
            ranked = sorted(zip(r.candidate_starts, r.candidate_scores, strict=True), key=lambda hs: hs[1])
            row = {
                "chunk": r.chunk,
                "attended latents": len(r.indices),
                "rule": "all earlier" if r.chosen_start is None else "12 recent + clip",
                "retrieved clip": "—" if r.chosen_start is None else f"{r.chosen_start}–{r.chosen_start + 3}",
                "D (chosen)": ranked[0][1] if ranked else None,
                "D (runner-up)": ranked[1][1] if len(ranked) > 1 else None,
                "candidates": len(r.candidate_starts),
            }
            for label, clips in recorded.items():
                got = clips.get(str(r.chunk))
                if r.chosen_start is None and got is None:
                    row[label] = "—"
                else:
                    row[label] = f"{got} ✓" if got == r.chosen_start else f"{got} ✗ (computed {r.chosen_start})"
            table.append(row)
        # Only a result that recorded its clips has columns after *candidates* (the model card's
        # trajectory tables are computed from the pose alone): the caption says which it is.
        caption = (md("Memory selection per chunk for {} (columns after *candidates*: the retrieved clip start "
                      "recorded by the result, ✓ = same as computed)", code(pose)) if recorded else
                   md("Memory selection per chunk for {}, computed from the pose with the selection rule",
                      code(pose)))
        out.append(markdown_table(table, formats={"D (chosen)": "{:.4f}", "D (runner-up)": "{:.4f}"},
                                  caption=caption))
        return join("\n", out)


# ------------------------------------------------------------------------------------------
# provenance, config, citation


def provenance_rows(res: Result) -> list[tuple[str, Markdown]]:
    p, r = res.provenance, res.result
    env = p.get("environment", {})
    git = p.get("git", {}) or {}
    dirty = {True: "dirty (uncommitted changes)", False: "clean"}.get(git.get("dirty"), "dirty state not recorded")
    changed = git.get("changed") or []
    commit = md("{} — {}, {}", code(git.get("commit") or "unknown"), dirty, git.get("source", "?"))
    if changed:
        commit += md("; changed: {}{}", join(", ", [code(c) for c in changed[:8]]), " …" if len(changed) > 8 else "")
    gpu = env.get("gpu") or {}
    smi = (env.get("nvidia_smi") or [{}])[0] if env.get("nvidia_smi") else {}
    device = md("{}: {}", res.device_class, res.device_name)
    if res.is_tiny:
        device += md(" — **{}**", TINY_LABEL)
    rows = [
        ("experiment / run", md("{} / {}", code(res.name), code(res.run_id))),
        ("config hash (sha256)", code(res.config_hash)),
        ("commit", commit),
        ("device class, device", device),
    ]
    if gpu:
        rows.append(("GPU", md("{} (compute {}, {} GiB, {} SMs)", gpu.get("name"), gpu.get("capability"),
                               gpu.get("memory_gib"), gpu.get("multiprocessors"))))
    if smi:
        rows.append(("driver, clocks", md("driver {}, SM clock {} (max {}), power limit {}, MIG {}",
                                          smi.get("driver_version"), smi.get("clocks.sm"), smi.get("clocks.max.sm"),
                                          smi.get("power.limit"), smi.get("mig.mode.current"))))
    rows += [
        ("torch / CUDA / cuDNN", md("{} / {} / {}", env.get("torch"), env.get("cuda") or "—", env.get("cudnn") or "—")),
        ("Python / numpy / platform", md("{} / {} / {}", env.get("python"), env.get("numpy", "—"), env.get("platform"))),
        ("weights", _weights(r, p)),
    ]
    if p.get("official"):
        off = p["official"]
        oenv = off.get("environment") or {}
        commit = off.get("commit") or oenv.get("official_commit")
        state = {True: "dirty", False: "clean"}.get(off.get("dirty"), off.get("source") or "state not recorded")
        extra = ", ".join(f"{k} {oenv[k]}" for k in ("torch", "diffusers", "attention") if oenv.get(k))
        rows.append(("official code", md("{} ({}){}", code(commit), state, f"; {extra}" if extra else "")))
    if p.get("image"):
        img = p["image"]
        rows.append(("image", md("{}, sha256 {}", img.get("kind", img.get("id", "")),
                                 code(str(img.get("sha256", ""))[:16]))))
    if p.get("text"):
        rows.append(("prompt", md("{} ({})", p["text"].get("source"), p["text"].get("prompt_source", ""))))
    if p.get("trajectory"):
        rows.append(("trajectory", escape(p["trajectory"])))
    rows += [
        ("started / finished (UTC)", md("{} / {} ({} s)", p.get("started_utc"), p.get("finished_utc"),
                                        p.get("duration_s"))),
        ("command", code(" ".join(map(str, p.get("command_line", []))))),
        ("host", md("{} ({} CPUs)", p.get("hostname"), env.get("cpu_count"))),
    ]
    return rows


def _weights(r: dict, p: dict) -> Markdown:
    parts = [code(r.get("weights"))]
    w = p.get("weights") or {}
    for part in ("dit", "vae"):
        if isinstance(w.get(part), dict):
            d = w[part]
            rev = f"@{d['revision']}" if d.get("revision") else ""
            parts.append(md("{}: {}{} ({} files hashed)", part, d.get("describe") or d.get("kind"), rev,
                            len(d.get("files") or {})))
    return join("; ", parts)


def bibtex(res: Result) -> Markdown:
    """A BibTeX entry for the run: every value BibTeX-escaped, the entry in a code block."""
    r = res.result
    b = bibtex_value
    year = str(r.get("started_utc", ""))[:4] or "n.d."
    key = _slug(f"worldplay-{res.name}-{res.run_id}")
    dirty = ", dirty tree" if r.get("git_dirty") else ""
    device = f"{res.device_name} ({res.device_class})" + (f"; {TINY_LABEL}" if res.is_tiny else "")
    note = (f"Pinned config experiments/{res.name}.toml, config sha256 {res.config_hash}; "
            f"code commit {r.get('git_commit')}{dirty}; {device}")
    entry = (
        f"@misc{{{key},\n"
        f"  title        = {{{{worldplay}} experiment {{{b(res.name)}}}, run {{{b(res.run_id)}}}}},\n"
        "  author       = {{worldplay contributors}},\n"
        f"  year         = {{{b(year)}}},\n"
        f"  howpublished = {{{b(f'experiments/results/{res.name}/{res.run_id}')}}},\n"
        f"  note         = {{{b(note)}}},\n"
        "}"
    )
    return code_block(entry, "bibtex")


# ------------------------------------------------------------------------------------------
# kind-specific results


def _steady_cell(stats: dict | None) -> str:
    if not stats:
        return "—"
    return f"{ms(stats['median'])} [{ms(stats['p10'])}, {ms(stats['p90'])}]"


def _peak(mem: dict | None) -> str:
    if not mem:
        return "—"
    if "peak_allocated_gib" in mem:
        return f"{mem['peak_allocated_gib']:.1f} GiB allocated ({mem.get('peak_reserved_gib', 0):.1f} reserved)"
    if "host_peak_rss_mib" in mem:
        return f"{mem['host_peak_rss_mib']:.0f} MiB host RSS"
    # A ranked leg: one entry per rank ("rank0 (cuda:0)": {...}), each shown like a one-rank leg.
    return "; ".join(f"{k}: {_peak(v)}" if isinstance(v, dict) else f"{k} {v}"
                     for k, v in mem.items() if k != "scope")


def bench_caption(exp: Experiment, what: str) -> Markdown:
    res = exp.result
    cfg = exp.config
    s = res.summary.get("steady_state", {})
    env = res.provenance.get("environment", {})
    h, w = cfg.resolution
    text = md("{} Card: **{}** ({}); {}×{}, {} chunks, pose {}, image {}, weights {}; warm-up {} chunks; "
              "*steady* = the median (p10–p90) over chunks {} of each of {} repetition(s) per leg. torch {}, CUDA {}; "
              "run {}.", what, res.device_name, res.device_class, h, w, cfg.num_chunk, code(cfg.pose), cfg.image,
              code(res.result.get("weights")), cfg.warmup_chunks, ", ".join(map(str, s.get("chunks", []))),
              cfg.repetitions, env.get("torch"), env.get("cuda") or "—", code(res.run_id))
    if res.is_tiny:
        text += md(" **{}.**", TINY_LABEL)
    return text


def _tiny_suffix(tiny: bool) -> str:
    return f" — {TINY_LABEL}" if tiny else ""


def bench_leg_table(exp: Experiment, caption: str) -> Markdown:
    summary = exp.result.summary
    rows = []
    for name, leg in summary.get("legs", {}).items():
        if leg.get("status") != "ok":
            rows.append({"leg": name, "status": f"{leg.get('status')}: {leg.get('reason', '')}"})
            continue
        st = leg.get("steady_ms", {})
        total = st.get("total", {}).get("median")
        settings = leg.get("settings", {})
        rows.append({
            "leg": name,
            "status": "ok",
            "steady total ms": ms(total),
            "steady frames/s": f"{FRAMES_PER_CHUNK / (total / 1000):.2f}" if total else "—",
            "DiT ms": ms(st.get("dit", {}).get("median")),
            "decode ms": ms(st.get("decode", {}).get("median")),
            "cold chunk 0 ms": ms(leg.get("cold_chunk0_ms", {}).get("total")),
            "peak memory": _peak(leg.get("peak_memory")),
            # The FLOP counts are the exact pipeline's; a reuse leg does less work, so no rate.
            "TFLOP/s (total)": ("n/a (reuse)" if settings.get("memory_mode") == "reuse"
                                else _num(leg.get("achieved", {}).get("total", {}).get("tflops"), "{:.3g}")),
            "settings": ", ".join(f"{k}={settings[k]}" for k in ("dtype", "accel", "attention_backend", "fused_kernels",
                                                                 "fast_decode", "memory_mode", "linear_dtype",
                                                                 "compile") if k in settings),
        })
    return markdown_table(rows, caption=caption, align={"settings": "l", "peak memory": "l"})


def bench_results(r: Renderer, exp: Experiment) -> Markdown:
    res = exp.result
    summary = res.summary
    cfg = exp.config
    out = [variance_note(res)]
    rate = summary.get("matmul_rate", {})
    if rate:
        out.append(md("Matmul rate measured in the same run: **{} TFLOP/s** median (best {}; {}).\n",
                      rate.get("median_tflops"), rate.get("best_tflops"), rate.get("label")))
    steady = summary.get("steady_state", {})
    out.append(md("Steady state: {} (chunks {}, warm-up {}, {} repetitions).\n", steady.get("definition", ""),
                  steady.get("chunks"), steady.get("warmup_chunks"), steady.get("repetitions")))
    tiny = res.is_tiny
    src = r.chart(f"{exp.name}-stages", lambda: charts.stage_bars(summary, title=f"{exp.name}: steady-state stage "
                                                                                 "times per chunk", tiny=tiny))
    out.append(r.figure(src, bench_caption(exp, "Steady-state time per stage and leg (bars: median; whiskers: p10–p90)."),
                        f"stage time bars of {exp.name}"))
    out.append(bench_leg_table(exp, "Per leg: steady-state medians, frames per second in the steady state "
                                    f"({FRAMES_PER_CHUNK} frames per chunk), cold chunk 0, peak memory, achieved "
                                    "TFLOP/s" + _tiny_suffix(tiny)))
    legs = charts.bench_legs(summary)
    stages = [s for s in ("select", "memory_select", "prefill", "kv_move", "step0", "step1", "step2", "step3", "steps",
                          "dit", "decode", "recv_wait", "interval", "sent_interval", "pipelined", "dit_call",
                          "decode_wall", "total")
              if any(s in summary["legs"][leg]["steady_ms"] for leg in legs)]
    df = pd.DataFrame([{"stage": s, **{leg: _steady_cell(summary["legs"][leg]["steady_ms"].get(s)) for leg in legs},
                        "n": max(summary["legs"][leg]["steady_ms"].get(s, {}).get("n", 0) for leg in legs)}
                       for s in stages])
    out.append(markdown_table(df, caption="Steady-state ms per chunk: median [p10, p90] per stage"
                                          + _tiny_suffix(tiny), align={leg: "r" for leg in legs}))
    accel_rows = [{"leg": leg, **{k: str([a.get(k, 0) for a in summary["legs"][leg]["accel"]])
                                  for k in ("captures", "replays", "compiled_calls", "eager_calls", "recompiles")}}
                  for leg in legs if summary["legs"][leg].get("accel")]
    if accel_rows:
        out.append(markdown_table(pd.DataFrame(accel_rows), caption="How the DiT calls ran, per repetition: CUDA-graph "
                                  "captures and replays, compiled and eager block calls, and dynamo recompiles "
                                  "after the first steady chunk"))
    src = r.chart(f"{exp.name}-chunks", lambda: charts.chunk_lines(res.chunks, summary, warmup_chunks=cfg.warmup_chunks,
                                                                  title=f"{exp.name}: time per chunk", tiny=tiny))
    out.append(r.figure(src, bench_caption(exp, "Per-chunk times: each repetition thin, the per-chunk median bold; "
                                                "the shaded warm-up chunks are left out of the steady state."),
                        f"per-chunk timing lines of {exp.name}"))
    ratios = summary.get("ratios", {})
    if ratios:
        stages_r = list(dict.fromkeys(s for v in ratios.values() for s in v))
        df = pd.DataFrame([{"ratio (time a / time b)": k, **{s: v.get(s) for s in stages_r}} for k, v in ratios.items()])
        out.append(markdown_table(df, formats={s: "{:.3f}" for s in stages_r},
                                  caption="Time ratios between legs of the same run (steady medians; > 1: the first "
                                          "leg is slower)"))
    floor = summary.get("flop_floor", {})
    if floor:
        df = pd.DataFrame([{"stage": s, "TFLOP per chunk": v.get("tflop"), "floor ms": v.get("floor_ms")}
                           for s, v in floor.items() if isinstance(v, dict)])
        out.append(markdown_table(df, formats={"TFLOP per chunk": "{:.4g}", "floor ms": "{:.4g}"},
                                  caption=f"FLOP floor per stage at {floor.get('rate_tflops')} TFLOP/s "
                                          f"({floor.get('rate_label')}): {floor.get('definition')}"))
    return join("\n", out)


def _comparison_table(summary: dict, tiny: bool) -> Markdown:
    rows = []
    for label, c in summary.get("comparison", {}).items():
        rows.append({
            "comparison": label,
            "mean abs diff": c.get("mean_abs_diff"),
            "last chunk": c.get("last_chunk_mean_abs_diff"),
            "max latent rel. error": c.get("max_latent_rel_error"),
            "frames > 5": f"{c.get('frames_over_5')} / {c.get('frames')}",
            "memory selections identical": {True: "yes", False: "no"}.get(c.get("memory_selection_identical"), "—"),
        })
    units = next(iter(summary.get("comparison", {}).values()), {}).get("units", "")
    return markdown_table(pd.DataFrame(rows), formats={"mean abs diff": "{:.4g}", "last chunk": "{:.4g}",
                                                       "max latent rel. error": "{:.3g}"},
                          caption=f"Differences ({units})" + _tiny_suffix(tiny))


def paired_results(r: Renderer, exp: Experiment, *, details: bool = True) -> Markdown:
    """Comparison table and drift chart; with ``details`` also the per-chunk and per-leg tables."""
    res = exp.result
    summary = res.summary
    tiny = res.is_tiny
    out = []
    if summary.get("regime"):
        out.append(md("Regime: {}.\n", summary["regime"]))
    out.append(_comparison_table(summary, tiny))
    if res.frames is not None and len(res.frames):
        src = r.chart(f"{exp.name}-drift", lambda: charts.drift_curves(
            res.frames, res.chunks, title=f"{exp.name}: differences over the rollout", tiny=tiny))
        h, w = exp.config.resolution
        cap = md("Mean {} of the uint8 frames per frame and latent relative error per chunk; {}×{}, {} chunks, pose "
                 "{}, on {} ({}){}.", "|Δ|", h, w, exp.config.num_chunk, code(exp.config.pose), res.device_name,
                 res.device_class, weights_note(res))
        out.append(r.figure(src, cap + (md(" **{}.**", TINY_LABEL) if tiny else M("")), f"drift curves of {exp.name}"))
    if not details:
        return join("\n", out)
    cols = [c for c in ("comparison", "chunk", "frames", "mean_abs_diff", "max_abs_diff", "frames_over_5", "psnr_db",
                        "latent_rel_error", "memory_match") if c in res.chunks.columns]
    out.append(markdown_table(res.chunks[cols], formats={"mean_abs_diff": "{:.4g}", "psnr_db": "{:.2f}",
                                                         "latent_rel_error": "{:.3g}"},
                              caption=md("Per chunk{}{}", weights_note(res), _tiny_suffix(tiny))))
    legs = summary.get("legs", {})
    if legs:
        rows = []
        for name, leg in legs.items():
            t = leg.get("timings", {})
            rows.append({"leg": name, "kind": leg.get("kind"), "steady DiT ms": ms(t.get("dit", {}).get("median")),
                         "steady decode ms": ms(t.get("decode", {}).get("median")),
                         "rollout wall s": leg.get("rollout_wall_s"), "peak memory": _peak(leg.get("peak_memory"))})
        out.append(markdown_table(pd.DataFrame(rows), caption="Legs (timings informational: chunks ≥ 4, one rollout)"
                                                              + _tiny_suffix(tiny),
                                  align={"peak memory": "l"}))
    return join("\n", out)


def rollout_cards(exp: Experiment) -> list[VideoCard]:
    """Cards of the result's videos, or the planned videos of a rollouts experiment not yet run."""
    if exp.result is None:
        from ..experiments.kinds.rollouts import pose_slug

        return planned_cards(exp.config, pose_slug=pose_slug)
    return cards_from_manifest(exp.result.videos or [], experiment=exp.name, tiny=exp.result.is_tiny)


def rollouts_results(r: Renderer, exp: Experiment) -> Markdown:
    res = exp.result
    s = res.summary
    tiny = res.is_tiny
    h, w = s.get("resolution", exp.config.resolution)
    out = [md("{} videos at {}×{}, {} fps; leg {}; prompts: {}.\n", s.get("videos"), h, w, s.get("fps"),
              code(s.get("leg", {}).get("name")), s.get("prompts"))]
    rows = []
    for vid, v in s.get("per_video", {}).items():
        entry = next((e for e in res.videos or [] if e.get("id") == vid), {})
        clips = v.get("retrieved_clips", {})
        rows.append({"video": code(vid), "input": entry.get("input"), "pose": code(entry.get("pose", "")),
                     "frames": v.get("frames"), "steady total ms": ms(v.get("steady_ms", {}).get("total", {}).get("median")),
                     "retrieved clips (chunk: clip)": ", ".join(f"{k}: {c}" for k, c in clips.items()) or "—",
                     "hosted": "yes" if entry.get("url") else "not yet"})
    out.append(markdown_table(rows, caption="Videos" + _tiny_suffix(tiny), align={"retrieved clips (chunk: clip)": "l"}))
    out.append(M("### Videos\n"))
    out.append(gallery_markdown(rollout_cards(exp)))
    return join("\n", out)


def interactive_results(r: Renderer, exp: Experiment) -> Markdown:
    res = exp.result
    s = res.summary
    tiny = res.is_tiny
    lat = s.get("latency_s") or {}
    gen = s.get("generate_ms") or {}
    overlap = s.get("overlap") or {}
    peak = s.get("peak_memory") or {}
    out = [md("Leg {}, {} chunk(s) generated ahead of the one playing, a warm-up world of {} chunk(s) before the "
              "measured one; key script {} ({}).\n", code((s.get("leg") or {}).get("name")), s.get("lead"),
              s.get("warmup_chunks"), code(s.get("script")), s.get("transport"))]
    out.append(key_value_table([
        ("key-to-frame latency", md("median {} s (min {}, max {}; {} of {} key changes shown)",
                                    _num(lat.get("median")), _num(lat.get("min")), _num(lat.get("max")),
                                    lat.get("n", 0), len(s.get("latency", [])))),
        ("sustained fps", md("{} (target {})", _num(s.get("sustained_fps")), s.get("target_fps"))),
        ("stalls", md("{} ({} s in all)", s.get("stalls"), _num(s.get("stall_s")))),
        ("generation per chunk", md("{} ms median from chunk 1 on: {} fps without the playback pacing",
                                    ms(gen.get("median")), _num(s.get("generate_fps")))),
        ("generation overlapping playback", md("median {} of each chunk's generation ran while the previous chunk "
                                               "played", _num(overlap.get("median"), "{:.0%}"))),
        ("server's keys = script's", md("{}{}", "yes, every chunk" if s.get("actions_match") else "no: chunks ",
                                        "" if s.get("actions_match") else ", ".join(map(str, s.get("mismatched_chunks", []))))),
        ("peak memory", _peak(peak)),
    ], caption="What the player saw" + _tiny_suffix(tiny)))
    out.append(key_value_table(list((s.get("definitions") or {}).items()),
                               caption="Definitions, as the run recorded them"))
    out.append(M("What running one chunk ahead costs: the server samples a chunk's keys when it starts "
                 "generating that chunk, and starts it just in time, one generation time (plus a 0.15 s margin) "
                 "before the chunk ahead of it runs out. A key change therefore waits for the next sampling and "
                 "then for the chunk ahead to play out: from the generation time plus the margin (a change just "
                 "before a sampling) to one chunk (1 s of playback) more (just after one); on a GPU slower than "
                 "real time the next chunk starts at once, so a change waits up to two generation times. "
                 "Without the lead the stream would stop for every chunk's generation.\n"))
    rows = [{"change": c.get("seq"), "keys": "+".join(c.get("keys", [])) or "(none)", "sent s": c.get("sent_s"),
             "first chunk with it": "not shown" if c.get("chunk") is None else c.get("chunk"),
             "latency s": c.get("latency_s")} for c in s.get("latency", [])]
    out.append(markdown_table(rows, formats={"sent s": "{:.3f}", "latency s": "{:.3f}"},
                              caption="Key changes of the script: when each was sent (s since the world started), the "
                                      "first chunk generated with it and the latency to its first frame"
                              + _tiny_suffix(tiny)))
    if res.chunks is not None and len(res.chunks):
        cols = {"chunk": "chunk", "keys_script": "script keys", "keys_server": "server keys", "keys_match": "same",
                "generate_ms": "generate ms", "dit_ms": "DiT ms", "decode_ms": "decode ms",
                "first_shown_s": "first shown s", "overlap": "overlap", "stalls": "stalls"}
        df = res.chunks[[c for c in cols if c in res.chunks.columns]].copy()
        for keys in ("keys_script", "keys_server"):  # no key held: an empty CSV cell
            df[keys] = df[keys].fillna("").astype(str).replace("", "(none)")
        if "keys_match" in df:
            df["keys_match"] = df["keys_match"].astype(str).str.lower().map({"true": "yes", "false": "NO"})
        df = df.rename(columns=cols)
        out.append(markdown_table(df, formats={"generate ms": ms, "DiT ms": ms, "decode ms": ms,
                                               "first shown s": "{:.3f}", "overlap": "{:.0%}"},
                                  caption="Per chunk: the keys the script's changes give and those the server sampled, "
                                          "generation time, when its first frame was shown, the share of its "
                                          "generation that overlapped the previous chunk's playback, stalls"
                                  + _tiny_suffix(tiny)))
    if res.frames is not None and len(res.frames):
        src = r.chart(f"{exp.name}-frames", lambda: charts.frame_arrivals(
            res.frames, s, title=f"{exp.name}: frame arrival and playback", tiny=tiny))
        out.append(r.figure(src, md("Every frame of the measured world: when it arrived and when it was shown, stalls "
                                    "shaded, key changes dashed at the time they were sent{}.", _tiny_suffix(tiny)),
                            f"frame arrival chart of {exp.name}"))
    return join("\n", out)


def recorded_memory_indices(exp: Experiment, pose: str) -> dict[str, dict[str, list[int]]]:
    """The latents each chunk attended to as recorded by the result (chunk -> indices), per leg
    or video, labelled as :func:`recorded_retrievals`; empty for results that predate recording."""
    if exp.result is None:
        return {}
    s = exp.result.summary
    if exp.kind == "bench":
        return {f"recorded: {leg}": v["memory_indices"] for leg, v in s.get("legs", {}).items()
                if isinstance(v.get("memory_indices"), dict)}
    if exp.kind in ("drift", "parity"):
        return {f"recorded: {leg}": v for leg, v in (s.get("memory_indices") or {}).items() if isinstance(v, dict)}
    if exp.kind == "rollouts":
        poses = {e["id"]: e.get("pose") for e in exp.result.videos or []}
        return {f"recorded: {vid.split('--')[1] if '--' in vid else vid}": v["memory_indices"]
                for vid, v in s.get("per_video", {}).items()
                if poses.get(vid) == pose and isinstance(v.get("memory_indices"), dict)}
    return {}


def recorded_retrievals(exp: Experiment, pose: str) -> dict[str, dict[str, Any]]:
    """Retrieved clip starts per chunk as recorded by the result, per leg or video."""
    if exp.result is None:
        return {}
    s = exp.result.summary
    if exp.kind == "bench":
        return {f"recorded: {leg}": v["retrieved_clips"] for leg, v in s.get("legs", {}).items()
                if isinstance(v.get("retrieved_clips"), dict)}
    if exp.kind in ("drift", "parity"):
        return {f"recorded: {leg}": v for leg, v in (s.get("retrieved_clips") or {}).items() if isinstance(v, dict)}
    if exp.kind == "rollouts":
        poses = {e["id"]: e.get("pose") for e in exp.result.videos or []}
        return {f"recorded: {vid.split('--')[1] if '--' in vid else vid}": v.get("retrieved_clips", {})
                for vid, v in s.get("per_video", {}).items() if poses.get(vid) == pose}
    return {}


# ------------------------------------------------------------------------------------------
# pages


def _poses(exp: Experiment) -> list[str]:
    """The pinned poses (none for an interactive experiment: its keys are played live)."""
    return list(getattr(exp.config, "poses", ()) or [p for p in [getattr(exp.config, "pose", None)] if p])


def experiment_page(r: Renderer, exp: Experiment) -> Markdown:
    cfg = exp.config
    res = exp.result
    out = [md("({})=\n# {}\n", M(_name(exp.name)), exp.name)]
    if res is not None:
        out += result_banners(res)
    if exp.is_tiny:
        out.append(tiny_admonition())
    out.append(md("{}\n", cfg.description or "(no description)"))
    status = md("fresh result {}", code(res.run_id)) if res else M("**not yet run**")
    if res is not None and res.filed_as:
        status = status + md(", filed as {} (an earlier name)", code(res.filed_as))
    out.append(key_value_table([
        ("kind", cfg.kind),
        ("device class", cfg.device_class + (f" ({TINY_LABEL})" if exp.is_tiny else "")),
        ("status", status + (M(" (required by the site)") if exp.required else M(""))),
        ("config hash", code(cfg.config_hash)),
    ]))
    out.append(M("## Pinned config\n"))
    if res:
        out.append(md("{} as it was read at the start of the run (copied into the result as `config.toml`), "
                      "verbatim{}:\n", code(f"experiments/{res.filed_as or exp.name}.toml"),
                      md(" (the experiment's earlier name; the file hashes as {} does now)",
                         code(f"experiments/{exp.name}.toml")) if res.filed_as else M("")))
        text = res.config_text
        if not res.filed_as and text != exp.pinned_text:
            out.append(M("The pinned file has changed since only in text that does not change the resolved config "
                         "(comments, layout, defaults spelled out); the result is still fresh.\n"))
    else:
        out.append(md("{}, verbatim:\n", code(f"experiments/{exp.name}.toml")))
        text = exp.pinned_text
    out.append(code_block(text.rstrip(), "toml"))
    if res is None:
        where = " on a CUDA machine" if cfg.device == "cuda" else ""
        out.append(md(":::{{admonition}} Not yet run\n:class: note\n\nThere is no result for {} yet. Run it with {}{} "
                      "and commit {}.\n:::\n", code(exp.name), code(f"python -m worldplay experiment run {exp.name}"),
                      where, code(f"experiments/results/{exp.name}/")))
    else:
        out.append(M("## Provenance\n"))
        out.append(key_value_table(provenance_rows(res), caption=md("Provenance of run {}{}", code(res.run_id),
                                                                    _tiny_suffix(res.is_tiny))))
        out.append(M("## Results\n"))
        if exp.kind == "bench":
            out.append(bench_results(r, exp))
        elif exp.kind in ("drift", "parity"):
            out.append(paired_results(r, exp))
        elif exp.kind == "rollouts":
            out.append(rollouts_results(r, exp))
        elif exp.kind == "interactive":
            out.append(interactive_results(r, exp))
        elif exp.kind == "per-input":
            out.append(per_input.per_input_results(r, exp))
    if _poses(exp):
        out.append(M("## Trajectories and memory retrieval\n"))
    for pose in _poses(exp):
        out.append(r.pose_section(pose, cfg.num_chunk, cfg.seed, recorded_retrievals(exp, pose),
                                  recorded_indices=recorded_memory_indices(exp, pose)))
    if exp.history:
        out.append(earlier_runs_table(exp))
    if res:
        out.append(M("## Cite\n"))
        out.append(M("The config hash and commit identify exactly what was run:\n"))
        out.append(bibtex(res))
    return join("\n", out)


def experiments_index(r: Renderer, site: Site) -> Markdown:
    rows = []
    for exp in site.experiments.values():
        res = exp.result
        status = md("fresh: {}", code(res.run_id)) if res else M("not yet run")
        if res is not None and res.filed_as:
            status = status + md(" (filed as {})", code(res.filed_as))
        rows.append({
            "experiment": r.doc(exp.name),
            "kind": exp.kind,
            "class": exp.config.device_class + (f" ({TINY_LABEL})" if exp.is_tiny else ""),
            "status": status + (M(" · required") if exp.required else M("")),
            "device": res.device_name if res else "—",
            "config hash": code(exp.config.config_hash[:12]),
        })
    return markdown_table(rows, caption=M("Pinned experiments (`experiments/*.toml`) and their latest results"))


def _not_run(names: tuple[str, ...], what: str) -> Markdown:
    listed = join(", ", [code(n) for n in names]) if names else M("none configured")
    return md(":::{{admonition}} Not yet run\n:class: note\n\nNo {} result yet ({}).\n:::\n", what, listed)


def card_performance(r: Renderer, site: Site) -> Markdown:
    exp = site.first_for("bench")
    if exp is None:
        return _not_run(site.config.model_card.get("bench", ()), "benchmark")
    res = exp.result
    out = result_banners(res)
    out.append(variance_note(res))
    if res.is_tiny:
        out.append(tiny_admonition("The numbers below")
                   + M("\nThe GPU bench (`bench`) replaces them here once its result is committed.\n"))
    out.append(md("From {} (run {} on **{}**; the page has every stage, ratio and FLOP floor).\n", r.doc(exp.name),
                  code(res.run_id), res.device_name or "an unnamed device"))
    tiny = res.is_tiny
    src = r.chart(f"{exp.name}-stages", lambda: charts.stage_bars(res.summary, title=f"{exp.name}: steady-state "
                                                                                    "stage times per chunk", tiny=tiny))
    out.append(r.figure(src, bench_caption(exp, "Steady-state time per stage and leg (bars: median; whiskers: p10–p90)."),
                        f"stage time bars of {exp.name}"))
    out.append(bench_leg_table(exp, f"Per leg, per chunk of {FRAMES_PER_CHUNK} frames (same run and settings as the "
                                    "chart)" + _tiny_suffix(tiny)))
    if not tiny:
        out.append(targets_table(exp, site.first_for("realtime"), site.all_for("fast_modes")))
    src = r.chart(f"{exp.name}-chunks", lambda: charts.chunk_lines(
        res.chunks, res.summary, warmup_chunks=exp.config.warmup_chunks, title=f"{exp.name}: time per chunk", tiny=tiny))
    out.append(r.figure(src, bench_caption(exp, "Per-chunk times (median bold, repetitions thin, warm-up shaded)."),
                        f"per-chunk timing lines of {exp.name}"))
    return join("\n", out)


# The performance targets of the project (issue 6), in one place: the model card compares the
# committed bench result against them. Thresholds, not results.
DIT_TARGET_MS, DIT_TARGET_SPEEDUP = 1000.0, 2.0
DECODE_TARGET_MS, DECODE_TARGET_SPEEDUP = 430.0, 1.7
REALTIME_FPS = (16.0, 24.0)


def _mode_of(leg: str) -> str:
    """A bench leg's mode, as drift experiments name their test leg (the leg table's
    ``drift_mode``): ``native-2gpu-reuse-fp8`` -> ``native-reuse-fp8``; the exact legs (one or two
    GPUs) -> ``native-fastest``; a leg the table does not know is its own mode."""
    row = LEG_TABLE.get(leg)
    return row.drift_mode if row else leg


def _is_two_gpu_pipeline(leg: str) -> bool:
    row = LEG_TABLE.get(leg)
    return row is not None and row.kind == PIPELINED


NOT_MEASURED = "not measured at full size"


def _drift_of(mode: str, drifts: list[Experiment]) -> Markdown:
    if mode == "native-fastest":
        return M("exact mode")
    for d in drifts:
        if d.result and not d.result.is_tiny and d.result.summary.get("test_leg") == mode:
            comp = next(iter(d.result.summary.get("comparison", {}).values()), {})
            return md("{:.1f}/255 mean, {:.1f} last chunk ({})", comp.get("mean_abs_diff", float("nan")),
                      comp.get("last_chunk_mean_abs_diff", float("nan")), code(d.name))
    return M(NOT_MEASURED)


def targets_table(exp: Experiment, realtime: Experiment | None = None, drifts: list[Experiment] = ()) -> Markdown:
    """The bench's fastest exact leg and its fast mode against the targets (empty without an
    official leg in the same run); the real-time rows also from ``realtime`` (the two-GPU bench),
    each with the drift of its mode against the exact mode where a full-size drift result has it."""
    legs = exp.result.summary.get("legs", {})
    fast, official = legs.get("native-fastest", {}), legs.get("official", {})
    if fast.get("status") != "ok" or official.get("status") != "ok":
        return M("")

    def med(leg: dict, stage: str) -> float | None:
        return leg.get("steady_ms", {}).get(stage, {}).get("median")

    def verdict(ok: bool) -> str:
        return "met" if ok else "not met"

    rows = []
    dit, dit_off = med(fast, "dit"), med(official, "dit")
    dec, dec_off = med(fast, "decode"), med(official, "decode")
    rows.append({"target": f"DiT per steady chunk <= {DIT_TARGET_MS:.0f} ms and >= {DIT_TARGET_SPEEDUP}x the official",
                 "measured": f"{dit:,.1f} ms, {dit_off / dit:.2f}x ({dit_off:,.1f} ms official)",
                 "status": verdict(dit <= DIT_TARGET_MS and dit_off / dit >= DIT_TARGET_SPEEDUP)})
    rows.append({"target": f"VAE decode per chunk <= {DECODE_TARGET_MS:.0f} ms and >= {DECODE_TARGET_SPEEDUP}x the official",
                 "measured": f"{dec:,.1f} ms, {dec_off / dec:.2f}x ({dec_off:,.1f} ms official)",
                 "status": verdict(dec <= DECODE_TARGET_MS and dec_off / dec >= DECODE_TARGET_SPEEDUP)})
    accel = fast.get("accel") or []
    if accel:
        replays = [a.get("replays", 0) for a in accel]
        recompiles = [a.get("recompiles", 0) for a in accel]
        rows.append({"target": "memory-engaged chunks as CUDA-graph replays, no recompiles",
                     "measured": f"replays {replays}, captures {[a.get('captures', 0) for a in accel]}, "
                                 f"steady-state recompiles {recompiles} (per repetition)",
                     "status": verdict(all(r > 0 for r in replays) and not any(recompiles))})
    for row in rows:
        row["drift vs exact"] = "exact mode"
    sources = [(exp, ("native-fastest", "native-reuse"))]
    if realtime is not None and realtime.result is not None:
        sources.append((realtime, tuple(n for n in realtime.result.summary.get("legs", {}) if _is_two_gpu_pipeline(n))))
    for source, names in sources:
        source_legs = source.result.summary.get("legs", {})
        for name in names:
            leg = source_legs.get(name, {})
            total = med(leg, "total") if leg.get("status") == "ok" else None
            if not total:
                continue
            fps = FRAMES_PER_CHUNK / (total / 1000)
            drift = _drift_of(_mode_of(name), list(drifts))
            gpus = LEG_TABLE[name].gpus if name in LEG_TABLE else "one GPU"
            status = " / ".join(verdict(fps >= t) for t in REALTIME_FPS)
            if drift == NOT_MEASURED:
                status += " (speed only)"
            rows.append({"target": md("real time on {}, {}: >= {:.0f} / {:.0f} fps", gpus, code(name), *REALTIME_FPS),
                         "measured": f"{total:,.1f} ms per chunk = {fps:.1f} fps"
                                     + ("" if source is exp else f" ({source.name})"),
                         "drift vs exact": drift, "status": status})
    caption = f"Against the project's performance targets ({exp.name}"
    if len(sources) > 1:
        caption += f" and, for two GPUs, {realtime.name}"
    caption += "; steady-state medians)"
    columns = ("target", "measured", "drift vs exact", "status")
    return markdown_table([{c: row[c] for c in columns} for row in rows], caption=caption,
                          align={"target": "l", "measured": "l", "drift vs exact": "l"})


def _card_paired(r: Renderer, exp: Experiment, intro: str = "From ") -> Markdown:
    res = exp.result
    out = result_banners(res)
    out += [tiny_admonition("The numbers below")] if res.is_tiny else []
    out.append(md("{}{}: {} against {} with the same weights and inputs{}.\n", M(intro), r.doc(exp.name),
                  code(res.summary.get("test_leg")), code(res.summary.get("reference_leg")), weights_note(res)))
    out.append(paired_results(r, exp, details=False))
    return join("\n", out)


def card_fast_modes(r: Renderer, site: Site) -> Markdown:
    """Every fast mode with a drift result; a tiny-CPU result only where no GPU one exists."""
    shown, out = set(), []
    exps = sorted(site.all_for("fast_modes"), key=lambda e: e.is_tiny)
    for exp in exps:
        leg = exp.result.summary.get("test_leg")
        if leg in shown:
            continue
        shown.add(leg)
        out.append(_card_paired(r, exp, intro_of(leg) or "From "))
    if not out:
        return _not_run(site.config.model_card.get("fast_modes", ()), "fast-mode drift")
    return join("\n", out)


def card_memory(site: Site) -> Markdown:
    """The "which card runs which mode" table (:mod:`worldplay.site.cards`)."""
    exp = site.first_for("memory")
    if exp is None:
        return _not_run(site.config.model_card.get("memory", ()), "memory benchmark")
    out = [tiny_admonition("The numbers below")] if exp.result.is_tiny else []
    out.append(card_table(exp, site.all_for("memory_drift")))
    return join("\n", out)


def card_drift(r: Renderer, site: Site) -> Markdown:
    exp = site.first_for("drift")
    if exp is None:
        return _not_run(site.config.model_card.get("drift", ()), "drift")
    return _card_paired(r, exp)


def card_parity(r: Renderer, site: Site) -> Markdown:
    exp = site.first_for("parity")
    if exp is None:
        names = site.config.model_card.get("parity", ())
        listed = join(", ", [code(n) for n in names]) if names else M("none configured")
        return md(":::{{admonition}} Not yet run\n:class: note\n\nThe parity experiment against the official code "
                  "({}) has no result yet: it needs a CUDA GPU and an official checkout "
                  "(`nox -s parity -- --official PATH`). Until it is committed, this card makes no parity claim.\n"
                  ":::\n", listed)
    res = exp.result
    out = result_banners(res)
    out.append(md("From {} (run {}, {}): the native code against the official code with identical weights{}, next to "
                  "the official code's own floor ({}).\n", r.doc(exp.name), code(res.run_id), res.device_name,
                  weights_note(res), res.summary.get("floor")))
    out.append(_comparison_table(res.summary, res.is_tiny))
    return join("\n", out)


def card_trajectories(r: Renderer, site: Site) -> Markdown:
    seen: dict[tuple[str, int, int], None] = {}
    for exp in site.experiments.values():
        for pose in _poses(exp):
            seen.setdefault((pose, exp.config.num_chunk, exp.config.seed), None)
    out = [M("The pinned experiments use these trajectories:\n")]
    for pose, num_chunk, seed in seen:
        out.append(r.pose_section(pose, num_chunk, seed, {}, level="###"))
    return join("\n", out)


def gallery_fragment(experiments: list[Experiment], *, headings: bool) -> Markdown:
    """Video cards of ``experiments`` (planned "not yet run" cards for those without a result);
    with ``headings`` one subsection per experiment."""
    out = []
    if any(e.is_tiny for e in experiments):
        out.append(tiny_admonition("Videos marked so"))
    if not experiments:
        out.append(gallery_markdown([]))
    for exp in experiments:
        link = Renderer.doc_link(exp.name)
        if headings:
            out.append(md("## {}\n", exp.name))
        state = md("run {}", code(exp.result.run_id)) if exp.result else M("not yet run")
        out.append(md("From {} ({}).\n", link, state))
        out.append(gallery_markdown(rollout_cards(exp)))
    return join("\n", out)


def card_gallery(site: Site) -> list[Experiment]:
    """The model card shows the first ``model_card.gallery`` experiment with a result, else the
    planned videos of the first one listed."""
    names = site.config.model_card.get("gallery", ())
    first = site.first_for("gallery")
    if first is not None:
        return [first]
    return [site.experiments[names[0]]] if names else []


#: Written into every output folder by :func:`render_site`: only a folder holding it is ever replaced.
RENDER_MARKER = ".worldplay-render"


class OutputFolderRefused(SiteError):
    """``--out`` names something that render did not make (and so must not replace)."""


def check_output_folder(out_dir: Path) -> None:
    """Refuse an output folder that render did not make: render replaces its output as a whole,
    so anything else there would be deleted. A new or empty folder is fine."""
    if out_dir.is_symlink():
        raise OutputFolderRefused(f"--out {out_dir} is a symbolic link; pass the folder itself (or a new one)")
    if not out_dir.exists() or (out_dir / RENDER_MARKER).is_file():
        return
    if not out_dir.is_dir():
        raise OutputFolderRefused(f"--out {out_dir} is a file, not a folder; pass a new or empty folder")
    entries = sorted(p.name for p in out_dir.iterdir())
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise OutputFolderRefused(
            f"--out {out_dir} is not a folder that render made (no {RENDER_MARKER} in it) and holds {len(entries)} "
            f"entr{'y' if len(entries) == 1 else 'ies'} ({shown}); render replaces its output folder as a whole, so "
            "pass a new or empty folder (an output of an older render, from before the marker, can be deleted by hand)")


def render_site(site: Site, out_dir: Path) -> list[Path]:
    """Write every generated file into ``out_dir`` (replaced as a whole, atomically enough: the
    new tree is built next to it and renamed into place). Returns the files written.

    ``out_dir`` must be new, empty or an earlier output of this function (it holds
    :data:`RENDER_MARKER`); anything else is refused with :class:`OutputFolderRefused`."""
    out_dir = Path(out_dir)
    check_output_folder(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    old = None
    try:
        r = Renderer(tmp)
        pages: dict[str, Markdown] = {}
        for exp in site.experiments.values():
            pages[f"experiments/{exp.name}.md"] = experiment_page(r, exp)
        pages["fragments/experiments_index.md"] = experiments_index(r, site)
        pages["fragments/model_card_performance.md"] = card_performance(r, site)
        pages["fragments/model_card_summary.md"] = card_summary(site)
        pages["fragments/model_card_per_input.md"] = per_input.card_per_input(r, site)
        pages["fragments/model_card_drift.md"] = card_drift(r, site)
        pages["fragments/model_card_memory.md"] = card_memory(site)
        pages["fragments/model_card_fast_modes.md"] = card_fast_modes(r, site)
        pages["fragments/model_card_parity.md"] = card_parity(r, site)
        pages["fragments/model_card_trajectories.md"] = card_trajectories(r, site)
        pages["fragments/model_card_gallery.md"] = gallery_fragment(card_gallery(site), headings=False)
        pages["fragments/gallery.md"] = gallery_fragment(
            [e for e in site.experiments.values() if e.kind == "rollouts"], headings=True)
        for rel, text in pages.items():
            if not isinstance(text, Markdown):  # a page built by plain string formatting: data unescaped
                raise TypeError(f"{rel}: the page is a {type(text).__name__}, not Markdown built by worldplay.site.text")
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text.rstrip() + "\n", encoding="utf-8")
        (tmp / RENDER_MARKER).write_text("Made by `python -m worldplay.site render`, which replaces this folder as a "
                                         "whole on its next run.\n", encoding="utf-8")
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".old-{out_dir.name}-", dir=out_dir.parent))
            os.rename(out_dir, old)  # onto the empty folder just made
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out_dir.exists():
            os.rename(old, out_dir)  # the previous output stays
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return sorted(p for p in out_dir.rglob("*") if p.is_file())


__all__ = ["RENDER_MARKER", "OutputFolderRefused", "SiteError", "experiment_page", "render_site"]
