"""The video gallery: sphinx-design cards generated from the video manifests (``videos.json`` of
rollout results), never written by hand.

* A manifest entry with an ``https`` URL becomes a card with an HTML ``<video>`` element
  (``preload="none"``: nothing is fetched until the reader presses play).
* An entry with an empty URL becomes an explicit "not hosted yet" card (never a broken link);
  ``worldplay publish`` uploads the videos and fills the URLs in.
* A rollouts experiment without a result shows the videos its pinned config plans, as
  "not yet run" cards.
* Any other URL (``http:``, ``file:``, relative, or with characters that do not belong in a
  URL) is refused with a :class:`~worldplay.site.SiteError` naming the video and experiment.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from . import TINY_LABEL, SiteError

_BAD_URL_CHARS = re.compile(r"[\s\"'<>`\\\x00-\x1f\x7f]")


def check_https_url(url: str, what: str) -> str:
    """``url`` if it is an absolute ``https://host/...`` URL, else :class:`SiteError`."""
    if not isinstance(url, str):
        raise SiteError(f"{what}: url must be a string, got {type(url).__name__}")
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.netloc or _BAD_URL_CHARS.search(url):
        raise SiteError(f"{what}: url {url!r} is not an https URL; the site renders https URLs only "
                        "(publish the video with `worldplay publish --base-url https://...`, or leave the url "
                        "empty to show it as not hosted yet)")
    return url


@dataclass(frozen=True)
class VideoCard:
    id: str
    experiment: str
    run_id: str
    input: str
    pose: str
    frames: int
    fps: float
    resolution: tuple[int, int]
    sha256: str
    bytes: int
    url: str  # "" = not hosted yet; else a checked https URL
    tiny: bool
    planned: bool = False  # from the pinned config of an experiment that has not run yet

    @property
    def hosted(self) -> bool:
        return bool(self.url)


def planned_cards(config, *, pose_slug) -> list[VideoCard]:
    """The videos a rollouts experiment that has not run yet will make (inputs x poses)."""
    h, w = config.resolution
    frames = 13 + 16 * (config.num_chunk - 1)
    return [VideoCard(id=f"{config.name}--{image}--{pose_slug(pose)}", experiment=config.name, run_id="", input=image,
                      pose=pose, frames=frames, fps=16.0, resolution=(h, w), sha256="", bytes=0, url="",
                      tiny=config.device_class == "cpu-tiny", planned=True)
            for image in config.inputs for pose in config.poses]


def cards_from_manifest(entries: list[dict], *, experiment: str, tiny: bool) -> list[VideoCard]:
    """Validate the entries of one ``videos.json`` and turn them into cards."""
    cards = []
    for i, e in enumerate(entries):
        what = f"experiment '{experiment}', video '{e.get('id', f'#{i}')}'"
        missing = [k for k in ("id", "file", "sha256", "frames", "fps", "resolution", "url") if k not in e]
        if missing:
            raise SiteError(f"{what}: manifest entry lacks {', '.join(missing)}")
        url = e["url"] or ""
        if url:
            check_https_url(url, what)
        h, w = e["resolution"]
        cards.append(VideoCard(id=e["id"], experiment=experiment, run_id=e.get("run_id", ""),
                               input=e.get("input", ""), pose=e.get("pose", ""), frames=int(e["frames"]),
                               fps=float(e["fps"]), resolution=(int(h), int(w)), sha256=e["sha256"],
                               bytes=int(e.get("bytes", 0)), url=url, tiny=tiny))
    return cards


def _card(card: VideoCard) -> str:
    title = f"{card.input} · `{card.pose}`" if card.input else card.id
    h, w = card.resolution
    footer = f"{card.experiment} · {card.frames} frames at {card.fps:g} fps · {h}×{w}"
    footer += f" · sha256 `{card.sha256[:12]}`" if card.sha256 else ""
    if card.tiny:
        footer += f" · **{TINY_LABEL}**"
    if card.hosted:
        src = html.escape(card.url, quote=True)
        label = html.escape(f"{card.id} ({card.experiment})", quote=True)
        body = (
            "```{raw} html\n"
            f'<video class="wp-video" controls preload="none" playsinline width="100%" src="{src}" '
            f'title="{label}">Your browser cannot play this video: <a href="{src}">download the MP4</a>.</video>\n'
            "```\n"
        )
        classes = "wp-video-card wp-hosted"
    elif card.planned:
        body = (f"**Not yet run.** `{card.experiment}` has no result yet; this video appears once it has run and "
                "been published.\n")
        classes = "wp-video-card wp-not-hosted wp-not-run"
    else:
        body = ("**Not hosted yet.** The MP4 exists only where it was rendered; `worldplay publish` uploads it "
                "and fills in its URL.\n")
        classes = "wp-video-card wp-not-hosted"
    return (f"::::{{grid-item-card}} {title}\n:class-card: {classes}\n:shadow: sm\n\n{body}\n"
            f":::{{card-footer}}\n{footer}\n:::\n::::\n")


def gallery_markdown(cards: list[VideoCard]) -> str:
    """A sphinx-design grid of video cards (or a sentence saying there are none yet)."""
    if not cards:
        return ("No rollout results yet: the gallery fills in from the video manifests of the rollout "
                "experiments (`nox -s rollouts`).\n")
    hosted = sum(c.hosted for c in cards)
    planned = sum(c.planned for c in cards)
    made = len(cards) - planned
    head = (f"{made} videos, {hosted} hosted, {made - hosted} not hosted yet" if made else "No videos yet")
    head += f"; {planned} planned, not yet run.\n\n" if planned else ".\n\n"
    body = "\n".join(_card(c) for c in cards)
    return f"{head}:::::{{grid}} 1 2 2 3\n:gutter: 3\n:class-container: wp-gallery\n\n{body}:::::\n"


__all__ = ["VideoCard", "cards_from_manifest", "check_https_url", "gallery_markdown", "planned_cards"]
