"""The per-input experiment on the site: one table row per sample input (its thumbnail, how it was
resized or cropped, both speed legs' steady medians and their ratio, the parity ramp, memory
selections), the spread of the test leg's DiT across inputs, and the per-input drift curves.

Thumbnails come from the committed result (``thumbnails/<input>.png``, listed in its digests) and
are copied next to the charts (``generated/thumbnails/<experiment>/``); every value reaches the
page through :mod:`.text`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import TINY_LABEL, SiteError, charts
from .load import Experiment, Site
from .tables import markdown_table
from .text import Markdown, code, join, md

if TYPE_CHECKING:
    from .pages import Renderer

M = Markdown


def _ms(x: Any) -> str:
    from .pages import ms

    return ms(x)


def geometry_text(g: dict[str, Any], resolution: tuple[int, int]) -> str:
    """``1344×704 → crop 32,0–1312,704`` style: what load_image did to reach the model's frame."""
    h, w = resolution
    sw, sh = g["source_size"]
    rw, rh = g["resized_size"]
    left, top, right, bottom = g["crop_box"]
    parts = [f"{sw}×{sh}"]
    if g.get("scale") != 1:
        parts.append(f"{'upscaled' if g.get('upscaled') else 'downscaled'} ×{g['scale']:.3g} to {rw}×{rh}")
    if g.get("cropped"):
        parts.append(f"centre crop x {left}–{right}, y {top}–{bottom}")
    if len(parts) == 1:
        parts.append("as given")
    return f"{', '.join(parts)} → {w}×{h}"


def thumbnail(r: Renderer, exp: Experiment, image: str, rel: str) -> Markdown:
    """An inline image of the committed thumbnail ``rel`` of ``exp``'s result, copied into the
    generated tree once."""
    res = exp.result
    source = (res.path / rel).resolve()
    if not source.is_relative_to(res.path.resolve()) or not source.is_file() or rel not in res.result.get("files", []):
        raise SiteError(f"experiment '{exp.name}': thumbnail {rel!r} of input {image!r} is not a file of its result "
                        f"{res.path}; re-run `python -m worldplay experiment run {exp.name}`")
    name = f"thumbnails/{exp.name}/{source.name}"
    src = r.asset(name, source)
    return md("![{}]({})", f"the {image} frame the model received", M(src))


def _ramp(values: list[float]) -> str:
    return " → ".join(f"{v:.3g}" for v in values) if values else "—"


def _yes_no(flag: Any) -> str:
    return {True: "yes", False: "no"}.get(flag, "—")


def per_input_table(r: Renderer, exp: Experiment, caption_prefix: str = "Per input") -> Markdown:
    res = exp.result
    s = res.summary
    test, ref = s.get("speed_legs", ["?", "?"])
    ptest, pref = s.get("parity_legs", ["?", "?"])
    rows = []
    for image, e in s.get("inputs", {}).items():
        legs = e.get("legs", {})

        def med(leg: str, stage: str, legs: dict = legs) -> Any:
            return legs.get(leg, {}).get("steady_ms", {}).get(stage, {}).get("median")

        parity = e.get("parity", {})
        ratio = e.get("ratio", {})
        rows.append({
            "frame the model received": thumbnail(r, exp, image, e["thumbnail"]),
            "input": code(image),
            "resize / crop": geometry_text(e["geometry"], exp.config.resolution),
            "DiT ms (test / ref.)": f"{_ms(med(test, 'dit'))} / {_ms(med(ref, 'dit'))}",
            "DiT ratio": f"{ratio['dit']:.2f}×" if "dit" in ratio else "—",
            "decode ms (test / ref.)": f"{_ms(med(test, 'decode'))} / {_ms(med(ref, 'decode'))}",
            "decode ratio": f"{ratio['decode']:.2f}×" if "decode" in ratio else "—",
            "parity mean |Δ|": f"{parity['mean_abs_diff']:.3g}" if "mean_abs_diff" in parity else "—",
            "per-chunk ramp": _ramp(parity.get("per_chunk_mean_abs_diff", [])),
            "same memory selections": f"{_yes_no(parity.get('memory_selection_identical'))} / "
                                      f"{_yes_no(e.get('speed_memory_selection_identical'))}",
        })
    caption = md("{}: steady medians (chunks {}) of the test leg {} and the reference {}, ratio = reference / test; "
                 "parity = {} against {}, mean {} of the uint8 frames (0–255) over the rollout and per chunk; same "
                 "memory selections: parity legs / speed legs; run {} on {}", caption_prefix,
                 ", ".join(map(str, s.get("steady_state", {}).get("chunks", []))), code(test), code(ref), code(ptest),
                 code(pref), "|Δ|", code(res.run_id), res.device_label)
    align = {c: "l" for c in ("frame the model received", "input", "resize / crop", "per-chunk ramp")}
    align.update({c: "r" for c in ("DiT ms (test / ref.)", "DiT ratio", "decode ms (test / ref.)", "decode ratio",
                                   "parity mean |Δ|")})
    return markdown_table(rows, caption=caption, align=align)


def spread_text(exp: Experiment) -> Markdown:
    """The spread of each speed leg's steady DiT median across inputs, stated."""
    s = exp.result.summary
    parts = []
    for leg in s.get("speed_legs", []):
        d = s.get("spread", {}).get(leg, {}).get("dit")
        if d:
            parts.append(md("{}: {}–{} ms over {} inputs, max/min − 1 = {:.1%}, CV = {:.1%}", code(leg),
                            _ms(d["min_ms"]), _ms(d["max_ms"]), d["inputs"], d["max_over_min_minus_1"], d["cv"]))
    if not parts:
        return M("")
    return md("Spread of the steady DiT median across inputs (input independence): {}.\n", join("; ", parts))


def drift_figure(r: Renderer, exp: Experiment) -> Markdown:
    res = exp.result
    if res.frames is None or not len(res.frames):
        return M("")
    ptest, pref = res.summary.get("parity_legs", ["?", "?"])
    chunks = res.chunks[res.chunks["row"] == "parity"] if "row" in res.chunks.columns else res.chunks
    tiny = res.is_tiny
    src = r.chart(f"{exp.name}-drift", lambda: charts.drift_curves(
        res.frames, chunks, title=f"{exp.name}: {ptest} vs {pref}, per input", tiny=tiny))
    h, w = exp.config.resolution
    cap = md("Per input (one line each): mean {} of the uint8 frames of {} against {} per frame, and latent relative "
             "error per chunk; {}×{}, {} chunks, pose {}, on {}.", "|Δ|", code(ptest), code(pref), h, w,
             exp.config.num_chunk, code(exp.config.pose), res.device_label)
    return r.figure(src, cap + (md(" **{}.**", TINY_LABEL) if tiny else M("")), f"per-input drift curves of {exp.name}")


def per_input_results(r: Renderer, exp: Experiment) -> Markdown:
    """The experiment page's results: table, spread, drift curves, per-chunk parity rows."""
    res = exp.result
    out = [md("Regime: {}.\n", res.summary.get("regime", "")), per_input_table(r, exp), spread_text(exp),
           drift_figure(r, exp)]
    if "row" in res.chunks.columns:
        cols = [c for c in ("input", "chunk", "frames", "mean_abs_diff", "max_abs_diff", "frames_over_5", "psnr_db",
                            "latent_rel_error", "memory_match") if c in res.chunks.columns]
        parity = res.chunks[res.chunks["row"] == "parity"][cols]
        out.append(markdown_table(parity, formats={"mean_abs_diff": "{:.4g}", "psnr_db": "{:.2f}",
                                                   "latent_rel_error": "{:.3g}"},
                                  caption="Parity per input and chunk" + (f" — {TINY_LABEL}" if res.is_tiny else "")))
    return join("\n", out)


def card_per_input(r: Renderer, site: Site) -> Markdown:
    """The model card's per-input table (under the performance chart): the first
    ``model_card.per_input`` experiment with a result."""
    from .pages import _not_run, tiny_admonition

    exp = site.first_for("per_input")
    if exp is None:
        return _not_run(site.config.model_card.get("per_input", ()), "per-input")
    out = []
    if exp.result.is_tiny:
        gpu = [n for n in site.config.model_card.get("per_input", ()) if not site.experiments[n].is_tiny]
        out.append(tiny_admonition("The numbers below")
                   + (md("\nThe GPU run ({}) replaces them here once its result is committed.\n",
                         join(", ", [code(n) for n in gpu])) if gpu else M("")))
    out.append(md("From {}: every sample input through the bench and the parity harness in one run; each row shows the "
                  "frame the model actually received.\n", r.doc(exp.name)))
    out.append(per_input_table(r, exp, "Per sample input"))
    out.append(spread_text(exp))
    return join("\n", out)
