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

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from . import TINY_LABEL, SiteError
from .text import Markdown, code, code_block, escape, html_attribute, join, md

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
    """Cards of the entries of one ``videos.json`` (checked by
    :func:`worldplay.site.videos.check_video_manifest` when it was read); a URL that is not https
    is refused here, naming the video."""
    cards = []
    for e in entries:
        what = f"experiment '{experiment}', video {e['id']!r}"
        url = e["url"]
        if url:
            check_https_url(url, what)
        h, w = e["resolution"]
        cards.append(VideoCard(id=e["id"], experiment=experiment, run_id=e.get("run_id", ""),
                               input=e.get("input", ""), pose=e.get("pose", ""), frames=e["frames"],
                               fps=float(e["fps"]), resolution=(h, w), sha256=e["sha256"],
                               bytes=e.get("bytes", 0), url=url, tiny=tiny))
    return cards


def _card(card: VideoCard) -> Markdown:
    title = md("{} · {}", card.input, code(card.pose)) if card.input else escape(card.id)
    h, w = card.resolution
    footer = [md("{} · {} frames at {:g} fps · {}×{}", card.experiment, card.frames, card.fps, h, w)]
    if card.sha256:
        footer.append(md(" · sha256 {}", code(card.sha256[:12])))
    if card.tiny:
        footer.append(md(" · **{}**", TINY_LABEL))
    if card.hosted:
        src = html_attribute(card.url)
        label = html_attribute(f"{card.id} ({card.experiment})")
        body = code_block(
            f'<video class="wp-video" controls preload="none" playsinline width="100%" src="{src}" '
            f'title="{label}">Your browser cannot play this video: <a href="{src}">download the MP4</a>.</video>',
            "{raw} html")
        classes = "wp-video-card wp-hosted"
    elif card.planned:
        body = md("**Not yet run.** {} has no result yet; this video appears once it has run and been published.\n",
                  code(card.experiment))
        classes = "wp-video-card wp-not-hosted wp-not-run"
    else:
        body = Markdown("**Not hosted yet.** The MP4 exists only where it was rendered; `worldplay publish` uploads "
                        "it and fills in its URL.\n")
        classes = "wp-video-card wp-not-hosted"
    return md("::::{{grid-item-card}} {}\n:class-card: {}\n:shadow: sm\n\n{}\n:::{{card-footer}}\n{}\n:::\n::::\n",
              title, Markdown(classes), body, join("", footer))


def gallery_markdown(cards: list[VideoCard]) -> Markdown:
    """A sphinx-design grid of video cards (or a sentence saying there are none yet)."""
    if not cards:
        return Markdown("No rollout results yet: the gallery fills in from the video manifests of the rollout "
                        "experiments (`nox -s rollouts`).\n")
    hosted = sum(c.hosted for c in cards)
    planned = sum(c.planned for c in cards)
    made = len(cards) - planned
    head = md("{} videos, {} hosted, {} not hosted yet", made, hosted, made - hosted) if made else Markdown("No videos yet")
    head += md("; {} planned, not yet run.\n\n", planned) if planned else Markdown(".\n\n")
    body = join("\n", [_card(c) for c in cards])
    return md("{}:::::{{grid}} 1 2 2 3\n:gutter: 3\n:class-container: wp-gallery\n\n{}:::::\n", head, body)


__all__ = ["VideoCard", "cards_from_manifest", "check_https_url", "gallery_markdown", "planned_cards"]
