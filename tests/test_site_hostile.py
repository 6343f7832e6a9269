"""Text is data: hostile strings in results, configs and manifests never become markup.

The site is rendered from the hostile copy of the committed results (``hostile_site.py``: every
free-text value poisoned with payloads that try every way out of MyST Markdown into HTML), and
every generated page is parsed the way MyST parses it (its markdown-it configuration), directive
bodies and titles included. The only markup allowed is the markup the page writers produce: no
raw HTML, no links or images, no roles but the experiment links, no directives but the known
ones, and the one raw-HTML block is the video tag, escaped. The payloads must still be there, as
text. (tests/test_site_browser.py builds the same site with Sphinx and opens it in Chromium.)
"""

from __future__ import annotations

import re

import pytest

pytest.importorskip("pandas")
pytest.importorskip("matplotlib")
pytest.importorskip("myst_parser")

from hostile_site import DESCRIPTION, HOSTED_URL, PWN, hostile_experiments  # noqa: E402

from worldplay.site.load import load_site  # noqa: E402
from worldplay.site.pages import render_site  # noqa: E402

#: markdown-it token types the page writers produce; anything else came from data.
ALLOWED_TOKENS = {
    "paragraph_open", "paragraph_close", "inline", "text", "code_inline", "strong_open", "strong_close", "em_open",
    "em_close", "heading_open", "heading_close", "table_open", "table_close", "thead_open", "thead_close",
    "tbody_open", "tbody_close", "tr_open", "tr_close", "th_open", "th_close", "td_open", "td_close", "fence",
    "colon_fence", "myst_role", "myst_target", "softbreak",
}
#: pages whose own writer makes a bullet list (the model card's summary): list tokens are allowed
#: there only, so a hostile value that turns into a list anywhere else still fails
LIST_PAGES = {"fragments/model_card_summary.md"}
LIST_TOKENS = {"bullet_list_open", "bullet_list_close", "list_item_open", "list_item_close"}
#: directives (``{name}``) the page writers use, and plain code blocks (info = language)
DIRECTIVES = {"admonition", "figure", "table", "grid", "grid-item-card", "card-footer", "raw"}
CODE_BLOCKS = {"toml", "bibtex"}
VIDEO_TAG = re.compile(r'<video class="wp-video" controls preload="none" playsinline width="100%" '
                       r'src="https://[^"<>`\s]*" title="[^"<>`\n]*">Your browser cannot play this video: '
                       r'<a href="https://[^"<>`\s]*">download the MP4</a>\.</video>')
EXPERIMENT_LINK = re.compile(r"[a-z0-9-]+ </generated/experiments/[a-z0-9-]+>")


def _parser():
    from markdown_it.renderer import RendererHTML
    from myst_parser.config.main import MdParserConfig
    from myst_parser.parsers.mdit import create_md_parser

    # docs/conf.py: myst_enable_extensions
    return create_md_parser(MdParserConfig(enable_extensions={"colon_fence", "deflist", "fieldlist"}), RendererHTML)


def _body(content: str) -> str:
    """A directive's body without its leading ``:option: value`` lines."""
    lines = content.splitlines()  # as MyST splits directive bodies
    while lines and re.match(r"^:[\w-]+:", lines[0]):
        lines.pop(0)
    return "\n".join(lines)


def walk(md, text: str, where: str, out: list[tuple[str, object]]) -> None:
    """Every token of ``text``, recursing into directive titles and bodies as MyST does."""
    for token in md.parse(text):
        _visit(md, token, where, out)


def _visit(md, token, where: str, out: list) -> None:
    out.append((where, token))
    for child in token.children or []:
        _visit(md, child, where, out)
    if token.type in ("fence", "colon_fence"):
        m = re.fullmatch(r"\{([\w-]+)\}\s*(.*)", token.info.strip(), flags=re.S)
        if m and m.group(1) in DIRECTIVES - {"raw", "figure"}:
            for t in md.parseInline(m.group(2)):
                _visit(md, t, where, out)
        if m and m.group(1) in DIRECTIVES - {"raw"}:
            walk(md, _body(token.content), where, out)


@pytest.fixture(scope="module")
def hostile_pages(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hostile")
    experiments = hostile_experiments(root)
    site = load_site(root / "site.toml", experiments_dir=experiments)
    out = root / "generated"
    render_site(site, out)
    return {p.relative_to(out).as_posix(): p.read_text(encoding="utf-8") for p in out.rglob("*.md")}


def test_hostile_strings_stay_text_on_every_page(hostile_pages):
    md = _parser()
    tokens: list[tuple[str, object]] = []
    for rel, text in hostile_pages.items():
        walk(md, text, rel, tokens)
    problems = []
    for where, t in tokens:
        if t.type in LIST_TOKENS and where in LIST_PAGES:
            continue
        if t.type not in ALLOWED_TOKENS:
            problems.append((where, t.type, t.content[:80]))
        elif t.type == "myst_role" and not (t.meta.get("name") == "doc" and EXPERIMENT_LINK.fullmatch(t.content)):
            problems.append((where, "role", t.meta.get("name"), t.content[:80]))
        elif t.type == "myst_target" and not re.fullmatch(r"[a-z0-9-]+", t.content):
            problems.append((where, "target", t.content[:80]))
        elif t.type in ("fence", "colon_fence"):
            m = re.fullmatch(r"\{([\w-]+)\}\s*(.*)", t.info.strip(), flags=re.S)
            if m is None and t.info.strip() not in CODE_BLOCKS:
                problems.append((where, "code block", t.info[:80]))
            elif m is not None and m.group(1) not in DIRECTIVES:
                problems.append((where, "directive", m.group(1)))
            elif m is not None and m.group(1) == "raw" and not (m.group(2) == "html"
                                                                and VIDEO_TAG.fullmatch(t.content.strip())):
                problems.append((where, "raw", t.content[:200]))
    assert not problems, problems[:20]
    # the payloads are on the pages, as text
    texts = [t.content for _, t in tokens if t.type in ("text", "code_inline")]
    assert sum(PWN in text for text in texts) > 50
    raw = [t.content for _, t in tokens if t.type in ("fence", "colon_fence") and t.info.startswith("{raw}")]
    assert raw and all(HOSTED_URL.replace("&", "&amp;") in r and "&lt;script&gt;" in r for r in raw)


def test_a_hostile_description_renders_as_exactly_its_text(hostile_pages):
    md = _parser()
    page = hostile_pages["experiments/rollouts-tiny-cpu.md"]
    paragraphs = [t for t in md.parse(page) if t.type == "inline" and PWN in "".join(c.content for c in t.children)]
    text = "".join(c.content for c in paragraphs[0].children)
    assert [c.type for c in paragraphs[0].children] == ["text"]
    assert text == DESCRIPTION.replace("\x1c", "\N{REPLACEMENT CHARACTER}")
