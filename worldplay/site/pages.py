"""Generated Markdown: one page per pinned experiment, the experiment index, and the fragments
that the hand-written pages (``docs/model_card.md``, ``docs/gallery.md``, ``docs/experiments.md``)
include.

Output layout (``docs/generated/``, git-ignored, rebuilt by ``nox -s docs``)::

    experiments/<name>.md        one page per pinned experiment (run or not yet run)
    charts/*.svg                 every chart (deterministic bytes)
    fragments/*.md               included by the hand-written pages

Charts and cross-references use source-root paths (``/generated/...``), so a fragment renders
the same wherever it is included.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..pose import load_trajectory
from . import TINY_LABEL, SiteError, charts
from .gallery import VideoCard, cards_from_manifest, gallery_markdown, planned_cards
from .load import Experiment, Result, Site
from .tables import code, key_value_table, markdown_table

LATENTS_PER_CHUNK = 4
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


def tiny_admonition(what: str = "These results") -> str:
    return (f":::{{admonition}} {TINY_LABEL}\n:class: warning wp-tiny\n\n{what} come from the `tiny` preset on a "
            "CPU: they show that the harness works, not how the real model behaves or performs.\n:::\n")


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
        if name not in self.written:
            path = self.out / "charts" / f"{name}.svg"
            charts.save_svg(make(), path)
            self.written[name] = path
        return f"{self.prefix}/charts/{name}.svg"

    @staticmethod
    def figure(src: str, caption: str, alt: str) -> str:
        alt = alt.replace("\n", " ")
        return f":::{{figure}} {src}\n:alt: {alt}\n:width: 100%\n:class: wp-chart\n\n{caption}\n:::\n"

    def doc(self, name: str) -> str:
        return f"{{doc}}`{name} <{self.prefix}/experiments/{name}>`"

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
                     level: str = "###") -> str:
        """Trajectory plot, memory-retrieval map and selection table of one pinned pose."""
        title = f"{level} Pose `{pose}` ({num_chunk} chunks)\n\n"
        if pose.startswith("input:"):
            return (title + f"The trajectory comes from the input file `{pose[6:]}` (official sample data, not "
                    "committed), so it is not plotted here.\n")
        slug = f"pose-{_slug(pose)}-{num_chunk}"
        traj = load_trajectory(pose).for_chunks(num_chunk)
        src = self.chart(f"{slug}-trajectory", lambda: charts.trajectory_figure(
            traj.c2w, latents_per_chunk=LATENTS_PER_CHUNK, title=f"pose {pose!r}, {num_chunk} chunks"))
        out = [title, self.figure(
            src, f"Camera trajectory of `{pose}` ({len(traj)} latents, {num_chunk} chunks) from "
                 "`worldplay.pose.load_trajectory(pose).c2w`: left, the path seen from above (x right, z "
                 "forward) with one heading arrow per latent, coloured by chunk; right, yaw and pitch per latent.",
            f"top-down camera trajectory of pose {pose}")]
        rows = self.memory_rows(pose, num_chunk, seed)
        src = self.chart(f"{slug}-seed{seed}-memory", lambda: charts.memory_map(
            rows, latents_per_chunk=LATENTS_PER_CHUNK, title=f"memory retrieval, pose {pose!r} (cloud seed {seed})"))
        out.append(self.figure(
            src, "Memory-retrieval map: the latents each chunk attends to, computed with "
                 "`worldplay.memory_select.select_memory` from the pinned poses and the seeded point cloud "
                 f"`memory_point_cloud(generator=torch.Generator().manual_seed({seed}))`. Chunks 1–3 attend to every "
                 "earlier latent; from chunk 4 on, to the 12 most recent plus the 4-latent clip whose frusta best "
                 "overlap the chunk's (lowest score D).",
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
        df = pd.DataFrame(table)
        out.append(markdown_table(df, formats={"D (chosen)": "{:.4f}", "D (runner-up)": "{:.4f}"},
                                  caption=f"Memory selection per chunk for `{pose}` (columns after *candidates*: "
                                          "the retrieved clip start recorded by the result, ✓ = same as computed)"))
        return "\n".join(out)


# ------------------------------------------------------------------------------------------
# provenance, config, citation


def provenance_rows(res: Result) -> list[tuple[str, str]]:
    p, r = res.provenance, res.result
    env = p.get("environment", {})
    git = p.get("git", {}) or {}
    dirty = {True: "dirty (uncommitted changes)", False: "clean", None: "dirty state not recorded"}[git.get("dirty")]
    changed = git.get("changed") or []
    commit = f"`{git.get('commit') or 'unknown'}` — {dirty}, {git.get('source', '?')}"
    if changed:
        commit += "; changed: " + ", ".join(f"`{c}`" for c in changed[:8]) + (" …" if len(changed) > 8 else "")
    gpu = env.get("gpu") or {}
    smi = (env.get("nvidia_smi") or [{}])[0] if env.get("nvidia_smi") else {}
    device = f"{res.device_class}: {res.device_name}"
    if res.is_tiny:
        device += f" — **{TINY_LABEL}**"
    rows = [
        ("experiment / run", f"`{res.name}` / `{res.run_id}`"),
        ("config hash (sha256)", f"`{res.config_hash}`"),
        ("commit", commit),
        ("device class, device", device),
    ]
    if gpu:
        rows.append(("GPU", f"{gpu.get('name')} (compute {gpu.get('capability')}, {gpu.get('memory_gib')} GiB, "
                            f"{gpu.get('multiprocessors')} SMs)"))
    if smi:
        rows.append(("driver, clocks", f"driver {smi.get('driver_version')}, SM clock {smi.get('clocks.sm')} "
                                       f"(max {smi.get('clocks.max.sm')}), power limit {smi.get('power.limit')}, "
                                       f"MIG {smi.get('mig.mode.current')}"))
    rows += [
        ("torch / CUDA / cuDNN", f"{env.get('torch')} / {env.get('cuda') or '—'} / {env.get('cudnn') or '—'}"),
        ("Python / numpy / platform", f"{env.get('python')} / {env.get('numpy', '—')} / {env.get('platform')}"),
        ("weights", _weights(r, p)),
    ]
    if p.get("official"):
        off = p["official"]
        oenv = off.get("environment") or {}
        commit = off.get("commit") or oenv.get("official_commit")
        state = {True: "dirty", False: "clean"}.get(off.get("dirty"), off.get("source") or "state not recorded")
        extra = ", ".join(f"{k} {oenv[k]}" for k in ("torch", "diffusers", "attention") if oenv.get(k))
        rows.append(("official code", f"`{commit}` ({state})" + (f"; {extra}" if extra else "")))
    if p.get("image"):
        img = p["image"]
        rows.append(("image", f"{img.get('kind', img.get('id', ''))}, sha256 `{str(img.get('sha256', ''))[:16]}`"))
    if p.get("text"):
        rows.append(("prompt", f"{p['text'].get('source')} ({p['text'].get('prompt_source', '')})"))
    if p.get("trajectory"):
        rows.append(("trajectory", str(p["trajectory"])))
    rows += [
        ("started / finished (UTC)", f"{p.get('started_utc')} / {p.get('finished_utc')} ({p.get('duration_s')} s)"),
        ("command", code(" ".join(p.get("command_line", [])))),
        ("host", f"{p.get('hostname')} ({env.get('cpu_count')} CPUs)"),
    ]
    return rows


def _weights(r: dict, p: dict) -> str:
    parts = [f"`{r.get('weights')}`"]
    w = p.get("weights") or {}
    for part in ("dit", "vae"):
        if isinstance(w.get(part), dict):
            d = w[part]
            rev = f"@{d['revision']}" if d.get("revision") else ""
            parts.append(f"{part}: {d.get('describe') or d.get('kind')}{rev} ({len(d.get('files') or {})} files hashed)")
    return "; ".join(parts)


def bibtex(res: Result) -> str:
    r = res.result
    year = str(r.get("started_utc", ""))[:4] or "n.d."
    key = _slug(f"worldplay-{res.name}-{res.run_id}")
    dirty = ", dirty tree" if r.get("git_dirty") else ""
    device = f"{res.device_name} ({res.device_class})" + (f"; {TINY_LABEL}" if res.is_tiny else "")
    return (
        "```bibtex\n"
        f"@misc{{{key},\n"
        f"  title        = {{{{worldplay}} experiment {{{res.name}}}, run {{{res.run_id}}}}},\n"
        "  author       = {{worldplay contributors}},\n"
        f"  year         = {{{year}}},\n"
        f"  howpublished = {{experiments/results/{res.name}/{res.run_id}}},\n"
        f"  note         = {{Pinned config experiments/{res.name}.toml, config sha256 {res.config_hash}; "
        f"code commit {r.get('git_commit')}{dirty}; {device}}},\n"
        "}\n"
        "```\n"
    )


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
    return ", ".join(f"{k} {v}" for k, v in mem.items() if k != "scope")


def bench_caption(exp: Experiment, what: str) -> str:
    res = exp.result
    cfg = exp.config
    s = res.summary.get("steady_state", {})
    env = res.provenance.get("environment", {})
    h, w = cfg.resolution
    text = (f"{what} Card: **{res.device_name}** ({res.device_class}); {h}×{w}, {cfg.num_chunk} chunks, pose "
            f"`{cfg.pose}`, image {cfg.image}, weights `{res.result.get('weights')}`; warm-up {cfg.warmup_chunks} chunks; "
            f"*steady* = the median (p10–p90) over chunks {', '.join(map(str, s.get('chunks', [])))} of each of "
            f"{cfg.repetitions} repetition(s) per leg. torch {env.get('torch')}, CUDA {env.get('cuda') or '—'}; "
            f"run `{res.run_id}`.")
    if res.is_tiny:
        text += f" **{TINY_LABEL}.**"
    return text


def bench_leg_table(exp: Experiment, caption: str) -> str:
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
    return markdown_table(pd.DataFrame(rows), caption=caption, align={"settings": "l", "peak memory": "l"})


def bench_results(r: Renderer, exp: Experiment) -> str:
    res = exp.result
    summary = res.summary
    cfg = exp.config
    out = []
    rate = summary.get("matmul_rate", {})
    if rate:
        out.append(f"Matmul rate measured in the same run: **{rate.get('median_tflops')} TFLOP/s** median "
                   f"(best {rate.get('best_tflops')}; {rate.get('label')}).\n")
    steady = summary.get("steady_state", {})
    out.append(f"Steady state: {steady.get('definition', '')} (chunks {steady.get('chunks')}, warm-up "
               f"{steady.get('warmup_chunks')}, {steady.get('repetitions')} repetitions).\n")
    tiny = res.is_tiny
    src = r.chart(f"{exp.name}-stages", lambda: charts.stage_bars(summary, title=f"{exp.name}: steady-state stage "
                                                                                 "times per chunk", tiny=tiny))
    out.append(r.figure(src, bench_caption(exp, "Steady-state time per stage and leg (bars: median; whiskers: p10–p90)."),
                        f"stage time bars of {exp.name}"))
    out.append(bench_leg_table(exp, "Per leg: steady-state medians, frames per second in the steady state "
                                    f"({FRAMES_PER_CHUNK} frames per chunk), cold chunk 0, peak memory, achieved "
                                    "TFLOP/s" + (f" — {TINY_LABEL}" if tiny else "")))
    legs = charts.bench_legs(summary)
    stages = [s for s in ("select", "memory_select", "prefill", "kv_move", "step0", "step1", "step2", "step3", "steps",
                          "dit", "decode", "recv_wait", "interval", "sent_interval", "pipelined", "dit_call",
                          "decode_wall", "total")
              if any(s in summary["legs"][leg]["steady_ms"] for leg in legs)]
    df = pd.DataFrame([{"stage": s, **{leg: _steady_cell(summary["legs"][leg]["steady_ms"].get(s)) for leg in legs},
                        "n": max(summary["legs"][leg]["steady_ms"].get(s, {}).get("n", 0) for leg in legs)}
                       for s in stages])
    out.append(markdown_table(df, caption="Steady-state ms per chunk: median [p10, p90] per stage"
                                          + (f" — {TINY_LABEL}" if tiny else ""), align={leg: "r" for leg in legs}))
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
    return "\n".join(out)


def _comparison_table(summary: dict, tiny: bool) -> str:
    rows = []
    for label, c in summary.get("comparison", {}).items():
        rows.append({
            "comparison": label,
            "mean abs diff": c.get("mean_abs_diff"),
            "last chunk": c.get("last_chunk_mean_abs_diff"),
            "max latent rel. error": c.get("max_latent_rel_error"),
            "frames > 5": f"{c.get('frames_over_5')} / {c.get('frames')}",
            "memory selections identical": {True: "yes", False: "no", None: "—"}[c.get("memory_selection_identical")],
        })
    units = next(iter(summary.get("comparison", {}).values()), {}).get("units", "")
    return markdown_table(pd.DataFrame(rows), formats={"mean abs diff": "{:.4g}", "last chunk": "{:.4g}",
                                                       "max latent rel. error": "{:.3g}"},
                          caption=f"Differences ({units})" + (f" — {TINY_LABEL}" if tiny else ""))


def paired_results(r: Renderer, exp: Experiment, *, details: bool = True) -> str:
    """Comparison table and drift chart; with ``details`` also the per-chunk and per-leg tables."""
    res = exp.result
    summary = res.summary
    tiny = res.is_tiny
    out = []
    if summary.get("regime"):
        out.append(f"Regime: {summary['regime']}.\n")
    out.append(_comparison_table(summary, tiny))
    if res.frames is not None and len(res.frames):
        src = r.chart(f"{exp.name}-drift", lambda: charts.drift_curves(
            res.frames, res.chunks, title=f"{exp.name}: differences over the rollout", tiny=tiny))
        h, w = exp.config.resolution
        cap = (f"Mean |Δ| of the uint8 frames per frame and latent relative error per chunk; {h}×{w}, "
               f"{exp.config.num_chunk} chunks, pose `{exp.config.pose}`, on {res.device_name} ({res.device_class}).")
        out.append(r.figure(src, cap + (f" **{TINY_LABEL}.**" if tiny else ""), f"drift curves of {exp.name}"))
    if not details:
        return "\n".join(out)
    cols = [c for c in ("comparison", "chunk", "frames", "mean_abs_diff", "max_abs_diff", "frames_over_5", "psnr_db",
                        "latent_rel_error", "memory_match") if c in res.chunks.columns]
    out.append(markdown_table(res.chunks[cols], formats={"mean_abs_diff": "{:.4g}", "psnr_db": "{:.2f}",
                                                         "latent_rel_error": "{:.3g}"},
                              caption="Per chunk" + (f" — {TINY_LABEL}" if tiny else "")))
    legs = summary.get("legs", {})
    if legs:
        rows = []
        for name, leg in legs.items():
            t = leg.get("timings", {})
            rows.append({"leg": name, "kind": leg.get("kind"), "steady DiT ms": ms(t.get("dit", {}).get("median")),
                         "steady decode ms": ms(t.get("decode", {}).get("median")),
                         "rollout wall s": leg.get("rollout_wall_s"), "peak memory": _peak(leg.get("peak_memory"))})
        out.append(markdown_table(pd.DataFrame(rows), caption="Legs (timings informational: chunks ≥ 4, one rollout)"
                                                              + (f" — {TINY_LABEL}" if tiny else ""),
                                  align={"peak memory": "l"}))
    return "\n".join(out)


def rollout_cards(exp: Experiment) -> list[VideoCard]:
    """Cards of the result's videos, or the planned videos of a rollouts experiment not yet run."""
    if exp.result is None:
        from ..experiments.kinds.rollouts import pose_slug

        return planned_cards(exp.config, pose_slug=pose_slug)
    return cards_from_manifest(exp.result.videos or [], experiment=exp.name, tiny=exp.result.is_tiny)


def rollouts_results(r: Renderer, exp: Experiment) -> str:
    res = exp.result
    s = res.summary
    tiny = res.is_tiny
    h, w = s.get("resolution", exp.config.resolution)
    out = [f"{s.get('videos')} videos at {h}×{w}, {s.get('fps')} fps; leg `{s.get('leg', {}).get('name')}`; prompts: "
           f"{s.get('prompts')}.\n"]
    rows = []
    for vid, v in s.get("per_video", {}).items():
        entry = next((e for e in res.videos or [] if e.get("id") == vid), {})
        clips = v.get("retrieved_clips", {})
        rows.append({"video": code(vid), "input": entry.get("input"), "pose": code(entry.get("pose", "")),
                     "frames": v.get("frames"), "steady total ms": ms(v.get("steady_ms", {}).get("total", {}).get("median")),
                     "retrieved clips (chunk: clip)": ", ".join(f"{k}: {c}" for k, c in clips.items()) or "—",
                     "hosted": "yes" if entry.get("url") else "not yet"})
    out.append(markdown_table(pd.DataFrame(rows), caption="Videos" + (f" — {TINY_LABEL}" if tiny else ""),
                              align={"retrieved clips (chunk: clip)": "l"}))
    out.append("### Videos\n")
    out.append(gallery_markdown(rollout_cards(exp)))
    return "\n".join(out)


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
    return list(getattr(exp.config, "poses", ()) or [exp.config.pose])


def experiment_page(r: Renderer, exp: Experiment) -> str:
    cfg = exp.config
    res = exp.result
    out = [f"({exp.name})=\n# {exp.name}\n"]
    if exp.is_tiny:
        out.append(tiny_admonition())
    out.append((cfg.description or "(no description)") + "\n")
    status = f"fresh result `{res.run_id}`" if res else "**not yet run**"
    out.append(key_value_table([
        ("kind", cfg.kind),
        ("device class", cfg.device_class + (f" ({TINY_LABEL})" if exp.is_tiny else "")),
        ("status", status + (" (required by the site)" if exp.required else "")),
        ("config hash", f"`{cfg.config_hash}`"),
    ]))
    out.append("## Pinned config\n")
    if res:
        out.append(f"`experiments/{exp.name}.toml` as it was read at the start of the run (copied into the result as "
                   "`config.toml`), verbatim:\n")
        text = res.config_text
        if text != exp.pinned_text:
            out.append("The pinned file has changed since in text that the hash does not cover (description, "
                       "comments, spelling out defaults); the result is still fresh.\n")
    else:
        out.append(f"`experiments/{exp.name}.toml`, verbatim:\n")
        text = exp.pinned_text
    fence = "````" if "```" in text else "```"
    out.append(f"{fence}toml\n{text.rstrip()}\n{fence}\n")
    if res is None:
        out.append(":::{admonition} Not yet run\n:class: note\n\n"
                   f"There is no result for `{exp.name}` yet. Run it with `python -m worldplay experiment run "
                   f"{exp.name}`" + (" on a CUDA machine" if cfg.device == "cuda" else "") +
                   " and commit `experiments/results/" + exp.name + "/`.\n:::\n")
    else:
        out.append("## Provenance\n")
        out.append(key_value_table(provenance_rows(res), caption=f"Provenance of run `{res.run_id}`"
                                   + (f" — {TINY_LABEL}" if res.is_tiny else "")))
        out.append("## Results\n")
        if exp.kind == "bench":
            out.append(bench_results(r, exp))
        elif exp.kind in ("drift", "parity"):
            out.append(paired_results(r, exp))
        elif exp.kind == "rollouts":
            out.append(rollouts_results(r, exp))
    out.append("## Trajectories and memory retrieval\n")
    for pose in _poses(exp):
        out.append(r.pose_section(pose, cfg.num_chunk, cfg.seed, recorded_retrievals(exp, pose)))
    if res:
        out.append("## Cite\n")
        out.append("The config hash and commit identify exactly what was run:\n")
        out.append(bibtex(res))
    return "\n".join(out)


def experiments_index(r: Renderer, site: Site) -> str:
    rows = []
    for exp in site.experiments.values():
        res = exp.result
        rows.append({
            "experiment": r.doc(exp.name),
            "kind": exp.kind,
            "class": exp.config.device_class + (f" ({TINY_LABEL})" if exp.is_tiny else ""),
            "status": (f"fresh: `{res.run_id}`" if res else "not yet run") + (" · required" if exp.required else ""),
            "device": res.device_name if res else "—",
            "config hash": f"`{exp.config.config_hash[:12]}`",
        })
    return markdown_table(pd.DataFrame(rows), caption="Pinned experiments (`experiments/*.toml`) and their latest results")


def _not_run(names: tuple[str, ...], what: str) -> str:
    listed = ", ".join(f"`{n}`" for n in names) or "none configured"
    return f":::{{admonition}} Not yet run\n:class: note\n\nNo {what} result yet ({listed}).\n:::\n"


def card_performance(r: Renderer, site: Site) -> str:
    exp = site.first_for("bench")
    if exp is None:
        return _not_run(site.config.model_card.get("bench", ()), "benchmark")
    res = exp.result
    out = []
    if res.is_tiny:
        out.append(tiny_admonition("The numbers below")
                   + "\nThe H100 bench (`bench-h100`) replaces them here once its result is committed.\n")
    out.append(f"From {r.doc(exp.name)} (run `{res.run_id}`; the page has every stage, ratio and FLOP floor).\n")
    tiny = res.is_tiny
    src = r.chart(f"{exp.name}-stages", lambda: charts.stage_bars(res.summary, title=f"{exp.name}: steady-state "
                                                                                    "stage times per chunk", tiny=tiny))
    out.append(r.figure(src, bench_caption(exp, "Steady-state time per stage and leg (bars: median; whiskers: p10–p90)."),
                        f"stage time bars of {exp.name}"))
    out.append(bench_leg_table(exp, f"Per leg, per chunk of {FRAMES_PER_CHUNK} frames (same run and settings as the "
                                    "chart)" + (f" — {TINY_LABEL}" if tiny else "")))
    if not tiny:
        out.append(targets_table(exp, site.first_for("realtime"), site.all_for("fast_modes")))
    src = r.chart(f"{exp.name}-chunks", lambda: charts.chunk_lines(
        res.chunks, res.summary, warmup_chunks=exp.config.warmup_chunks, title=f"{exp.name}: time per chunk", tiny=tiny))
    out.append(r.figure(src, bench_caption(exp, "Per-chunk times (median bold, repetitions thin, warm-up shaded)."),
                        f"per-chunk timing lines of {exp.name}"))
    return "\n".join(out)


# The performance targets of the project (issue 6), in one place: the model card compares the
# committed bench result against them. Thresholds, not results.
DIT_TARGET_MS, DIT_TARGET_SPEEDUP = 1000.0, 2.0
DECODE_TARGET_MS, DECODE_TARGET_SPEEDUP = 430.0, 1.7
REALTIME_FPS = (16.0, 24.0)


def _mode_of(leg: str) -> str:
    """A bench leg's mode, as drift experiments name their test leg: ``native-2gpu-reuse-fp8`` ->
    ``native-reuse-fp8``; the exact legs (one or two GPUs) -> ``native-fastest``."""
    mode = leg.replace("-2gpu", "")
    return "native-fastest" if mode == "native" else mode


def _drift_of(mode: str, drifts: list[Experiment]) -> str:
    if mode == "native-fastest":
        return "exact mode"
    for d in drifts:
        if d.result and not d.result.is_tiny and d.result.summary.get("test_leg") == mode:
            comp = next(iter(d.result.summary.get("comparison", {}).values()), {})
            return (f"{comp.get('mean_abs_diff', float('nan')):.1f}/255 mean, "
                    f"{comp.get('last_chunk_mean_abs_diff', float('nan')):.1f} last chunk (`{d.name}`)")
    return "not measured at full size"


def targets_table(exp: Experiment, realtime: Experiment | None = None, drifts: list[Experiment] = ()) -> str:
    """The bench's fastest exact leg and its fast mode against the targets (empty without an
    official leg in the same run); the real-time rows also from ``realtime`` (the two-GPU bench),
    each with the drift of its mode against the exact mode where a full-size drift result has it."""
    legs = exp.result.summary.get("legs", {})
    fast, official = legs.get("native-fastest", {}), legs.get("official", {})
    if fast.get("status") != "ok" or official.get("status") != "ok":
        return ""

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
        sources.append((realtime, tuple(n for n in realtime.result.summary.get("legs", {}) if "2gpu" in n)))
    for source, names in sources:
        source_legs = source.result.summary.get("legs", {})
        for name in names:
            leg = source_legs.get(name, {})
            total = med(leg, "total") if leg.get("status") == "ok" else None
            if not total:
                continue
            fps = FRAMES_PER_CHUNK / (total / 1000)
            drift = _drift_of(_mode_of(name), list(drifts))
            gpus = "two GPUs" if "2gpu" in name else "one GPU"
            status = " / ".join(verdict(fps >= t) for t in REALTIME_FPS)
            if drift == "not measured at full size":
                status += " (speed only)"
            rows.append({"target": f"real time on {gpus}, `{name}`: >= {REALTIME_FPS[0]:.0f} / {REALTIME_FPS[1]:.0f} fps",
                         "measured": f"{total:,.1f} ms per chunk = {fps:.1f} fps"
                                     + ("" if source is exp else f" ({source.name})"),
                         "drift vs exact": drift, "status": status})
    caption = f"Against the project's performance targets ({exp.name}"
    if len(sources) > 1:
        caption += f" and, for two GPUs, {realtime.name}"
    caption += "; steady-state medians)"
    return markdown_table(pd.DataFrame(rows)[["target", "measured", "drift vs exact", "status"]], caption=caption,
                          align={"target": "l", "measured": "l", "drift vs exact": "l"})


# What each fast mode does, keyed by the test leg of its drift experiment.
FAST_MODE_INTROS = {
    "native-reuse": "**Reuse memory K/V** (`memory_mode=\"reuse\"`) keeps the memory keys and values of frames "
    "that stay selected (their RoPE keys re-rotated to the new rank) instead of re-prefilling all 16 memory "
    "latents every chunk, and computes only newly selected latents. It is an approximation: with depth, a "
    "frame's keys depend on the context they were computed in. Its deviation from the exact mode, from ",
    "native-fp8": "**FP8 linears** (`linear_dtype=\"fp8\"`) run the DiT blocks' linear layers in e4m3 with "
    "per-row scales (weights per output channel, activations per token). Its deviation from the bf16 "
    "pipeline, from ",
    "native-reuse-fp8": "**Reuse + FP8** (`memory_mode=\"reuse\"`, `linear_dtype=\"fp8\"`), the fastest mode and the "
    "two-GPU real-time leg's settings: both approximations at once. Its deviation from the exact bf16 pipeline, "
    "from ",
}


def _card_paired(r: Renderer, exp: Experiment, intro: str = "From ") -> str:
    res = exp.result
    out = [tiny_admonition("The numbers below")] if res.is_tiny else []
    out.append(f"{intro}{r.doc(exp.name)}: `{res.summary.get('test_leg')}` against "
               f"`{res.summary.get('reference_leg')}` with the same weights and inputs.\n")
    out.append(paired_results(r, exp, details=False))
    return "\n".join(out)


def card_fast_modes(r: Renderer, site: Site) -> str:
    """Every fast mode with a drift result; a tiny-CPU result only where no GPU one exists."""
    shown, out = set(), []
    exps = sorted(site.all_for("fast_modes"), key=lambda e: e.is_tiny)
    for exp in exps:
        leg = exp.result.summary.get("test_leg")
        if leg in shown:
            continue
        shown.add(leg)
        out.append(_card_paired(r, exp, FAST_MODE_INTROS.get(leg, "From ")))
    if not out:
        return _not_run(site.config.model_card.get("fast_modes", ()), "fast-mode drift")
    return "\n".join(out)


def card_drift(r: Renderer, site: Site) -> str:
    exp = site.first_for("drift")
    if exp is None:
        return _not_run(site.config.model_card.get("drift", ()), "drift")
    return _card_paired(r, exp)


def card_parity(r: Renderer, site: Site) -> str:
    exp = site.first_for("parity")
    if exp is None:
        return (":::{admonition} Not yet run\n:class: note\n\nThe parity experiment against the official code "
                f"({', '.join(f'`{n}`' for n in site.config.model_card.get('parity', ())) or 'none configured'}) "
                "has no result yet: it needs a CUDA GPU and an official checkout "
                "(`nox -s parity -- --official PATH`). Until it is committed, this card makes no parity claim.\n:::\n")
    res = exp.result
    out = [f"From {r.doc(exp.name)} (run `{res.run_id}`, {res.device_name}): the native code against the official "
           f"code with identical weights, next to the official code's own floor ({res.summary.get('floor')}).\n"]
    out.append(_comparison_table(res.summary, res.is_tiny))
    return "\n".join(out)


def card_trajectories(r: Renderer, site: Site) -> str:
    seen: dict[tuple[str, int, int], None] = {}
    for exp in site.experiments.values():
        for pose in _poses(exp):
            seen.setdefault((pose, exp.config.num_chunk, exp.config.seed), None)
    out = ["The pinned experiments use these trajectories:\n"]
    for pose, num_chunk, seed in seen:
        out.append(r.pose_section(pose, num_chunk, seed, {}, level="###"))
    return "\n".join(out)


def gallery_fragment(experiments: list[Experiment], *, headings: bool) -> str:
    """Video cards of ``experiments`` (planned "not yet run" cards for those without a result);
    with ``headings`` one subsection per experiment."""
    out = []
    if any(e.is_tiny for e in experiments):
        out.append(tiny_admonition("Videos marked so"))
    if not experiments:
        out.append(gallery_markdown([]))
    for exp in experiments:
        link = f"{{doc}}`{exp.name} </{GENERATED}/experiments/{exp.name}>`"
        if headings:
            out.append(f"## {exp.name}\n")
        state = f"run `{exp.result.run_id}`" if exp.result else "not yet run"
        out.append(f"From {link} ({state}).\n")
        out.append(gallery_markdown(rollout_cards(exp)))
    return "\n".join(out)


def card_gallery(site: Site) -> list[Experiment]:
    """The model card shows the first ``model_card.gallery`` experiment with a result, else the
    planned videos of the first one listed."""
    names = site.config.model_card.get("gallery", ())
    first = site.first_for("gallery")
    if first is not None:
        return [first]
    return [site.experiments[names[0]]] if names else []


def render_site(site: Site, out_dir: Path) -> list[Path]:
    """Write every generated file into ``out_dir`` (replaced as a whole, atomically enough: the
    new tree is built next to it and renamed into place). Returns the files written."""
    out_dir = Path(out_dir)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        r = Renderer(tmp)
        pages: dict[str, str] = {}
        for exp in site.experiments.values():
            pages[f"experiments/{exp.name}.md"] = experiment_page(r, exp)
        pages["fragments/experiments_index.md"] = experiments_index(r, site)
        pages["fragments/model_card_performance.md"] = card_performance(r, site)
        pages["fragments/model_card_drift.md"] = card_drift(r, site)
        pages["fragments/model_card_fast_modes.md"] = card_fast_modes(r, site)
        pages["fragments/model_card_parity.md"] = card_parity(r, site)
        pages["fragments/model_card_trajectories.md"] = card_trajectories(r, site)
        pages["fragments/model_card_gallery.md"] = gallery_fragment(card_gallery(site), headings=False)
        pages["fragments/gallery.md"] = gallery_fragment(
            [e for e in site.experiments.values() if e.kind == "rollouts"], headings=True)
        for rel, text in pages.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text.rstrip() + "\n", encoding="utf-8")
        old = out_dir.parent / f".old-{out_dir.name}-{os.getpid()}"
        if out_dir.exists():
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(p for p in out_dir.rglob("*") if p.is_file())


__all__ = ["SiteError", "experiment_page", "render_site"]
