"""Charts as deterministic SVGs (matplotlib, no pyplot state).

Two renders of the same results give byte-identical files: the SVG id salt is fixed
(``svg.hashsalt``), the date metadata is dropped, text is drawn as paths in DejaVu Sans (shipped
with matplotlib, so no system font is consulted), everything is vector (no embedded PNGs).

Charts: stage-time bars per leg and per-chunk timing lines (bench), drift curves over frames
and chunks (drift, parity), top-down camera trajectories of the pinned poses, and the
memory-retrieval map (which earlier latents each chunk attends to).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from . import TINY_LABEL

STYLE = {
    "svg.hashsalt": "worldplay-site",
    "svg.fonttype": "path",
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "legend.frameon": False,
    "path.simplify": False,
    "figure.dpi": 100,
    "savefig.dpi": 100,
}
#: Okabe-Ito: distinguishable with the common colour-vision deficiencies.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
BENCH_STAGES = ("select", "memory_select", "prefill", "kv_move", "steps", "dit", "decode", "total")
LINE_STAGES = (("dit", "DiT (prefill + 4 steps)"), ("decode", "VAE decode"), ("total", "total (DiT + decode)"))


@contextmanager
def style() -> Iterator[None]:
    with matplotlib.rc_context(STYLE):
        yield


def new_figure(width: float, height: float, **kw) -> Figure:
    return Figure(figsize=(width, height), layout="constrained", **kw)


def svg_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    with style():
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": "worldplay.site (matplotlib)"})
    return buf.getvalue()


def save_svg(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as SVG to ``path`` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(svg_bytes(fig))
    return path


def plain(text: object) -> str:
    """A label from data (leg, comparison, experiment, pose) for matplotlib: a '$' pair would
    start mathtext, which raises on anything it cannot parse; ``\\$`` is drawn as a dollar sign.
    (Tick labels keep mathtext: log axes use it.)"""
    return str(text).replace("$", r"\$")


def _title(text: str, tiny: bool) -> str:
    text = plain(text)
    return f"{text}\n[{TINY_LABEL}]" if tiny else text


def _colours(labels) -> dict[str, str]:
    return {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}


# ------------------------------------------------------------------------------------------
# bench


def bench_legs(summary: dict) -> list[str]:
    """Legs of a bench summary that produced timings (skipped legs are left out)."""
    return [name for name, leg in summary.get("legs", {}).items() if leg.get("steady_ms")]


def stage_bars(summary: dict, *, title: str, tiny: bool) -> Figure:
    """Steady-state median per stage and leg, p10-p90 whiskers (horizontal grouped bars)."""
    legs = bench_legs(summary)
    stages = [s for s in BENCH_STAGES if any(s in summary["legs"][leg]["steady_ms"] for leg in legs)]
    colours = _colours(legs)
    with style():
        fig = new_figure(7.2, 0.22 * len(stages) * max(1, len(legs)) + 1.5)
        ax = fig.add_subplot()
        height = 0.8 / max(1, len(legs))
        y = np.arange(len(stages))
        for i, leg in enumerate(legs):
            stats = summary["legs"][leg]["steady_ms"]
            med = np.array([stats.get(s, {}).get("median", np.nan) for s in stages], dtype=float)
            lo = np.array([stats.get(s, {}).get("p10", np.nan) for s in stages], dtype=float)
            hi = np.array([stats.get(s, {}).get("p90", np.nan) for s in stages], dtype=float)
            pos = y - 0.4 + height * (i + 0.5)
            ax.barh(pos, med, height=height * 0.9, color=colours[leg], label=plain(leg))
            for yy, value, top in zip(pos, med, hi, strict=True):
                if np.isfinite(value):
                    ax.annotate(f"{value:,.0f}" if value >= 100 else f"{value:.3g}",
                                (np.nanmax([value, top]), yy), xytext=(3, 0), textcoords="offset points",
                                va="center", fontsize=6.5, color="#333333")
            ax.errorbar(med, pos, xerr=np.vstack([med - lo, hi - med]), fmt="none", ecolor="#333333",
                        elinewidth=0.8, capsize=2)
        ax.set_yticks(y, stages)
        ax.invert_yaxis()
        ax.set_xlabel("ms per chunk (steady-state median; whiskers p10–p90)")
        ax.grid(axis="y", visible=False)
        fig.legend(loc="outside lower center", ncols=max(1, len(legs)))
        ax.set_title(_title(title, tiny), loc="left")
    return fig


def chunk_lines(chunks: pd.DataFrame, summary: dict, *, warmup_chunks: int, title: str, tiny: bool) -> Figure:
    """Per-chunk stage times per leg: every repetition thin, the per-chunk median bold; the
    warm-up chunks (left out of the steady state) shaded."""
    legs = bench_legs(summary)
    colours = _colours(legs)
    with style():
        fig = new_figure(7.2, 2.8)
        axes = fig.subplots(1, len(LINE_STAGES), sharex=True)
        for ax, (stage, label) in zip(axes, LINE_STAGES, strict=True):
            rows = chunks[(chunks["stage"] == stage) & chunks["leg"].isin(legs)]
            for leg in legs:
                mine = rows[rows["leg"] == leg]
                for _, rep in mine.groupby("repetition", sort=True):
                    rep = rep.sort_values("chunk")
                    ax.plot(rep["chunk"], rep["ms"], color=colours[leg], alpha=0.25, linewidth=0.8)
                med = mine.groupby("chunk", sort=True)["ms"].median()
                ax.plot(med.index, med.values, color=colours[leg], marker="o", markersize=3, linewidth=1.6,
                        label=plain(leg))
            if warmup_chunks:
                ax.axvspan(-0.5, warmup_chunks - 0.5, color="#999999", alpha=0.12, linewidth=0)
            ax.set_title(label, loc="left")
            ax.set_xlabel("chunk")
            steady = rows[rows["chunk"] >= warmup_chunks]["ms"]
            if len(steady) and rows["ms"].max() > 10 * max(float(steady.median()), 1e-9):
                ax.set_yscale("log")  # compile/warm-up chunks dwarf the steady state
                ax.set_title(f"{label} (log)", loc="left")
            else:
                ax.set_ylim(bottom=0)
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axes[0].set_ylabel("ms")
        handles, labels = axes[0].get_legend_handles_labels()
        handles.append(Patch(color="#999999", alpha=0.25, label=f"warm-up (chunks < {warmup_chunks})"))
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles))
        fig.suptitle(_title(title, tiny), x=0.01, ha="left", fontsize=10)
    return fig


# ------------------------------------------------------------------------------------------
# drift / parity


def drift_curves(frames: pd.DataFrame, chunks: pd.DataFrame, *, title: str, tiny: bool) -> Figure:
    """Per-frame mean |Δ| (chunk boundaries dotted) and per-chunk latent relative error, one
    line per comparison."""
    comparisons = list(dict.fromkeys(frames["comparison"]))
    colours = _colours(comparisons)
    with style():
        fig = new_figure(7.2, 3.0)
        ax_f, ax_c = fig.subplots(1, 2, width_ratios=[1.6, 1])
        for comp in comparisons:
            f = frames[frames["comparison"] == comp].sort_values("frame")
            ax_f.plot(f["frame"], f["mean_abs_diff"], color=colours[comp], linewidth=1.2, label=plain(comp))
            c = chunks[chunks["comparison"] == comp].sort_values("chunk")
            if "latent_rel_error" in c:
                ax_c.plot(c["chunk"], c["latent_rel_error"], color=colours[comp], marker="o", markersize=3,
                          linewidth=1.2, label=plain(comp))
        first = frames[frames["comparison"] == comparisons[0]]
        starts = first.groupby("chunk")["frame"].min().sort_index().tolist()[1:]
        for s in starts:
            ax_f.axvline(s - 0.5, color="#777777", linewidth=0.6, linestyle=":")
        ax_f.set_xlabel("frame (dotted: chunk boundaries)")
        ax_f.set_ylabel("mean |Δ| (uint8 levels)")
        ax_f.set_ylim(bottom=0)
        ax_f.set_title("per frame", loc="left")
        ax_c.set_xlabel("chunk")
        ax_c.set_ylabel("latent relative error")
        ax_c.set_ylim(bottom=0)
        ax_c.set_title("per chunk", loc="left")
        ax_c.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        handles, labels = ax_f.get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=max(1, len(labels)))
        fig.suptitle(_title(title, tiny), x=0.01, ha="left", fontsize=10)
    return fig


# ------------------------------------------------------------------------------------------
# trajectories and memory


def trajectory_figure(c2w: np.ndarray, *, latents_per_chunk: int, title: str) -> Figure:
    """Left: top-down view (x-z plane) of the camera positions, one arrow per latent for the
    heading (the camera's forward axis), coloured by chunk, chunk starts labelled. Right: yaw
    and pitch of the heading per latent (turns in place do not move the camera)."""
    pos = c2w[:, :3, 3]
    fwd = c2w[:, :3, 2]
    n = len(c2w)
    chunk = np.arange(n) // latents_per_chunk
    num_chunks = int(chunk.max()) + 1
    cmap = matplotlib.colormaps["viridis"].resampled(max(2, num_chunks))
    colours = cmap(chunk / max(1, num_chunks - 1))
    x, z = pos[:, 0], pos[:, 2]
    span = max(float(np.ptp(x)), float(np.ptp(z)), 0.05)
    arrow = 0.12 * span
    head = fwd[:, [0, 2]]
    norm = np.linalg.norm(head, axis=1, keepdims=True)
    head = np.divide(head, norm, out=np.zeros_like(head), where=norm > 0)
    yaw = np.degrees(np.arctan2(fwd[:, 0], fwd[:, 2]))
    pitch = np.degrees(np.arcsin(np.clip(-fwd[:, 1], -1.0, 1.0)))  # camera y points down
    with style():
        fig = new_figure(7.2, 3.3)
        ax, ax_a = fig.subplots(1, 2, width_ratios=[1, 1.25])
        ax.plot(x, z, color="#999999", linewidth=0.8, zorder=1)
        ax.quiver(x, z, head[:, 0] * arrow, head[:, 1] * arrow, color=colours, angles="xy",
                  scale_units="xy", scale=1, width=0.007, headwidth=4, headlength=5, zorder=2)
        ax.scatter(x, z, color=colours, s=9, zorder=3)
        labelled: set[tuple[float, float]] = set()
        for c in range(num_chunks):
            i = c * latents_per_chunk
            key = (round(float(x[i]), 3), round(float(z[i]), 3))
            if key not in labelled:  # chunks that start at the same spot share a label
                same = [d for d in range(num_chunks)
                        if (round(float(x[d * latents_per_chunk]), 3), round(float(z[d * latents_per_chunk]), 3)) == key]
                text = f"c{same[0]}" if len(same) == 1 else f"c{same[0]}–c{same[-1]}"
                ax.annotate(text, (x[i], z[i]), xytext=(5, -10), textcoords="offset points", fontsize=7,
                            color="#333333")
                labelled.add(key)
        ax.scatter([x[0]], [z[0]], marker="s", s=36, facecolors="none", edgecolors="black", zorder=4,
                   label="start")
        # A square window around everything drawn, so that the aspect is equal and nothing is cut.
        xs = np.concatenate([x, x + head[:, 0] * arrow])
        zs = np.concatenate([z, z + head[:, 1] * arrow])
        half = 0.5 * max(np.ptp(xs), np.ptp(zs)) + 0.15 * span
        cx, cz = 0.5 * (xs.min() + xs.max()), 0.5 * (zs.min() + zs.max())
        ax.set_xlim(cx - half, cx + half)
        ax.set_ylim(cz - half, cz + half)
        ax.set_aspect("equal", adjustable="box")
        ax.set_xlabel("x (right)")
        ax.set_ylabel("z (forward)")
        ax.legend(loc="upper left", fontsize=7)
        ax.set_title("top-down path (x–z), arrows: heading", loc="left", fontsize=9)
        latent = np.arange(n)
        ax_a.plot(latent, yaw, color="#0072B2", linewidth=1.2, label="yaw (+ = right)")
        ax_a.plot(latent, pitch, color="#D55E00", linewidth=1.2, linestyle="--", label="pitch (+ = up)")
        ax_a.scatter(latent, yaw, color=colours, s=9, zorder=3)
        for c in range(1, num_chunks):
            ax_a.axvline(c * latents_per_chunk - 0.5, color="#777777", linewidth=0.6, linestyle=":")
        ax_a.set_xlabel("latent (dotted: chunk boundaries)")
        ax_a.set_ylabel("degrees")
        ax_a.set_ylim(min(-10.0, float(yaw.min()), float(pitch.min())) - 2, max(10.0, float(yaw.max()), float(pitch.max())) + 2)
        ax_a.legend(loc="best", fontsize=7)
        ax_a.set_title("heading per latent", loc="left", fontsize=9)
        fig.suptitle(plain(title), x=0.01, ha="left", fontsize=10)
    return fig


@dataclass(frozen=True)
class MemoryRow:
    """What chunk ``chunk`` attends to (from :func:`worldplay.memory_select.select_memory`)."""

    chunk: int
    indices: list[int]
    context: list[int]
    retrieved: list[int]
    chosen_start: int | None
    candidate_starts: list[int]
    candidate_scores: list[float]


MEMORY_CATEGORIES = (
    ("not attended", "#f2f2f2"),
    ("history (all earlier latents)", "#56B4E9"),
    ("recent context (12 latents)", "#0072B2"),
    ("retrieved clip (best FOV overlap)", "#E69F00"),
    ("being generated", "#009E73"),
)


def memory_rows(viewmats: np.ndarray, num_chunk: int, seed: int, latents_per_chunk: int = 4) -> list[MemoryRow]:
    """Memory selections of every chunk of a trajectory, as the rollout makes them: the point
    cloud drawn from a CPU generator seeded with the rollout seed."""
    import torch

    from ..memory_select import memory_point_cloud, select_memory

    points = memory_point_cloud(generator=torch.Generator().manual_seed(seed))
    w2c = torch.tensor(np.array(viewmats[: num_chunk * latents_per_chunk]))
    rows = []
    for c in range(num_chunk):
        sel = select_memory(w2c, c * latents_per_chunk, points)
        rows.append(MemoryRow(chunk=c, indices=list(sel.indices), context=list(sel.context),
                              retrieved=list(sel.retrieved), chosen_start=sel.chosen_start,
                              candidate_starts=list(sel.candidate_starts),
                              candidate_scores=[float(s) for s in sel.candidate_scores]))
    return rows


RECENT_LATENTS = 12  # memory from chunk 4 on: the 12 most recent latents plus one 4-latent clip


def _latent(value: Any, below: int) -> int | None:
    """A recorded latent index (result files are input: anything else is dropped)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < below
    return value if ok else None


def _recorded_row(chunk: int, indices: list[int], clip: int | None, latents_per_chunk: int) -> MemoryRow:
    cur = chunk * latents_per_chunk
    indices = sorted({i for i in indices if _latent(i, cur) is not None})
    clip = _latent(clip, cur)
    # Without a clip (chunks 1-3) every index is history, none is recent context (as select_memory).
    retrieved = [] if clip is None else [i for i in indices if clip <= i < clip + latents_per_chunk]
    context = [] if clip is None else [i for i in indices if i not in retrieved]
    return MemoryRow(chunk=chunk, indices=list(indices), context=context,
                     retrieved=retrieved, chosen_start=clip, candidate_starts=[], candidate_scores=[])


def recorded_memory_rows(indices: dict[str, list[int]], clips: dict[str, int | None], num_chunk: int,
                         latents_per_chunk: int = 4) -> list[MemoryRow]:
    """The selections a run recorded (its summary's ``memory_indices``: chunk -> attended
    latents), with the recorded clip starts marking the retrieved clip."""
    rows = []
    for c in range(num_chunk):
        got = indices.get(str(c))
        rows.append(_recorded_row(c, got if isinstance(got, list) else [], clips.get(str(c)), latents_per_chunk))
    return rows


def memory_rows_from_clips(clips: dict[str, int | None], num_chunk: int, latents_per_chunk: int = 4) -> list[MemoryRow]:
    """The selections of a run that recorded only its retrieved clip starts (results before the
    indices were recorded): chunks 1-3 attend every earlier latent, later chunks the 12 most
    recent plus the recorded clip (the selection rule, worldplay.memory_select)."""
    rows = []
    for c in range(num_chunk):
        cur = c * latents_per_chunk
        clip = _latent(clips.get(str(c)), cur)
        if clip is None:
            indices = list(range(cur))
        else:
            indices = sorted({*range(cur - RECENT_LATENTS, cur), *range(clip, clip + latents_per_chunk)})
        rows.append(_recorded_row(c, indices, clip, latents_per_chunk))
    return rows


def memory_map(rows: list[MemoryRow], *, latents_per_chunk: int, title: str) -> Figure:
    """Chunk x latent grid: which earlier latents each chunk attends to, and why."""
    num_chunk = len(rows)
    latents = num_chunk * latents_per_chunk
    grid = np.zeros((num_chunk, latents))
    for r in rows:
        start = r.chunk * latents_per_chunk
        grid[r.chunk, start:start + latents_per_chunk] = 4
        if r.chosen_start is None:
            grid[r.chunk, r.indices] = 1
        else:
            grid[r.chunk, r.context] = 2
            grid[r.chunk, r.retrieved] = 3
    cmap = ListedColormap([c for _, c in MEMORY_CATEGORIES])
    with style():
        fig = new_figure(7.2, 0.28 * num_chunk + 1.9)
        ax = fig.add_subplot()
        ax.pcolormesh(np.arange(latents + 1) - 0.5, np.arange(num_chunk + 1) - 0.5, grid, cmap=cmap, vmin=-0.5,
                      vmax=len(MEMORY_CATEGORIES) - 0.5, edgecolors="white", linewidth=0.5)
        ax.set_ylim(num_chunk - 0.5, -0.5)
        ax.set_xlim(-0.5, latents - 0.5)
        ax.set_yticks(range(num_chunk), [f"chunk {c}" for c in range(num_chunk)])
        ax.set_xticks(range(0, latents, latents_per_chunk))
        ax.set_xlabel("latent frame (4 video frames each; chunk 0's first latent is the image)")
        ax.grid(False)
        for r in rows:
            if r.chosen_start is not None:
                ax.annotate(f"clip {r.chosen_start}", (r.chosen_start + 1.5, r.chunk), ha="center", va="center",
                            fontsize=6.5, color="black")
        fig.legend(handles=[Patch(facecolor=c, edgecolor="#bbbbbb", label=label) for label, c in MEMORY_CATEGORIES],
                   loc="outside lower center", ncols=3, fontsize=7.5)
        ax.set_title(plain(title), loc="left")
    return fig


__all__ = [
    "MemoryRow",
    "chunk_lines",
    "drift_curves",
    "memory_map",
    "memory_rows",
    "memory_rows_from_clips",
    "recorded_memory_rows",
    "save_svg",
    "stage_bars",
    "svg_bytes",
    "trajectory_figure",
]


# ------------------------------------------------------------------------------------------
# interactive


def frame_arrivals(frames: pd.DataFrame, summary: dict, *, title: str, tiny: bool) -> Figure:
    """Frames over time of a played world: when each arrived (dots) and was shown (line), the
    stalls shaded, each key change as a dashed line at the time it was sent."""
    with style():
        fig = new_figure(7.2, 3.4)
        ax = fig.add_subplot()
        n = np.arange(len(frames))
        shown = frames["shown_s"].to_numpy(dtype=float)
        arrived = frames["arrived_s"].to_numpy(dtype=float)
        ax.plot(shown, n, color=PALETTE[0], lw=1.2, label="shown (16 fps playback)")
        ax.plot(arrived, n, ".", color=PALETTE[1], ms=2.5, label="arrived")
        stalled = frames["stall"].astype(str).str.lower().eq("true").to_numpy()
        for i in np.flatnonzero(stalled):
            ax.axvspan(shown[i - 1], shown[i], color=PALETTE[3], alpha=0.18, lw=0)
        target = summary.get("target_fps") or 16
        steady = frames.index[frames["chunk"] >= 1]
        if len(steady):
            t0, i0 = shown[steady[0]], steady[0]
            # Where the steady frames would have been shown at the target rate, with no stall.
            ax.plot([t0, t0 + (len(frames) - 1 - i0) / target], [i0, len(frames) - 1], ":", color="#555555",
                    lw=0.8, label=f"{target:g} fps from chunk 1, no stall")
        top = len(frames)
        for change in summary.get("latency", []):
            ax.axvline(change["sent_s"], color=PALETTE[2], ls="--", lw=0.8)
            ax.annotate(plain("+".join(change["keys"]) or "release"), (change["sent_s"], top), xytext=(2, -2),
                        textcoords="offset points", fontsize=6.5, color=PALETTE[2], va="top", rotation=90)
        handles, labels = ax.get_legend_handles_labels()
        if stalled.any():
            handles.append(Patch(color=PALETTE[3], alpha=0.18))
            labels.append("stall")
        ax.set_xlabel("seconds since the world started")
        ax.set_ylabel("frame")
        ax.legend(handles, labels, loc="lower right", fontsize=7)
        ax.set_title(_title(title, tiny), loc="left")
    return fig
