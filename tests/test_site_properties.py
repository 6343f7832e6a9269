"""Property-based tests (hypothesis) of the two boundaries where site data comes in.

* :mod:`worldplay.site.text`: for any text, the escaped Markdown, parsed as MyST parses it (its
  markdown-it configuration, and docutils through MyST's own parser), is exactly that text as
  one text node: no HTML, no roles, no links, in a paragraph, a heading, a table cell, a
  directive title or mid-line. Code spans and code blocks keep any text verbatim.
* :mod:`worldplay.site.videos`: the video-manifest loader accepts every valid manifest as it is
  and refuses every invalid one with :class:`VideoManifestError`, never another exception.
"""

from __future__ import annotations

import json
import re
import string
import unicodedata

import pytest

pytest.importorskip("myst_parser")
pytest.importorskip("pandas")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from worldplay.site.tables import markdown_table  # noqa: E402
from worldplay.site.text import MISSING, code, code_block, escape  # noqa: E402
from worldplay.site.videos import OPTIONAL, REQUIRED, VideoManifestError, check_video_manifest  # noqa: E402

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Any text, with the characters Markdown is made of, and line ends of every kind, well represented.
SPECIAL = string.punctuation + " \t\n\r\x00\x0b\x0c\x1c\x85\u2028\u2029\xa0\u3000`|<>&#\\"
texts = st.text(st.one_of(st.characters(codec="utf-8"), st.sampled_from(SPECIAL)), max_size=60)


def _md():
    from markdown_it.renderer import RendererHTML
    from myst_parser.config.main import MdParserConfig
    from myst_parser.parsers.mdit import create_md_parser

    return create_md_parser(MdParserConfig(enable_extensions={"colon_fence", "deflist", "fieldlist"}), RendererHTML)


MD = _md()


def visible(text: str) -> str:
    """What a page can show of ``text``: control characters (but tab and line ends) as U+FFFD."""
    return "".join("\N{REPLACEMENT CHARACTER}" if unicodedata.category(c) == "Cc" and c not in "\t\n\r" else c
                   for c in text)


def _only_text(tokens, block: str) -> str:
    """The text of ``tokens`` = [<block>_open, inline, <block>_close] whose inline holds only text."""
    assert [t.type for t in tokens] == [f"{block}_open", "inline", f"{block}_close"], [t.type for t in tokens]
    children = tokens[1].children
    assert [c.type for c in children] == ["text"], [(c.type, c.content) for c in children]
    return children[0].content


@SETTINGS
@given(texts)
def test_escaped_text_is_exactly_the_text_in_every_place(text):
    if not text:
        assert escape(text) == "" and MD.parse(escape(text)) == []
        return
    e = escape(text)
    assert "\n" not in e and not re.search(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", e)  # one line, nothing hidden
    assert _only_text(MD.parse(e), "paragraph") == visible(text)
    assert _only_text(MD.parse(f"x {e} y"), "paragraph") == f"x {visible(text)} y"
    assert _only_text(MD.parse(f"## {e}"), "heading") == visible(text)
    # a table cell
    tokens = MD.parse(markdown_table([{"h": text}]))
    cells = [t for t in tokens if t.type == "inline"]
    assert [[c.type for c in t.children] for t in cells] == [["text"], ["text"]]
    assert cells[1].children[0].content == visible(text)
    # a directive title (MyST parses the argument inline)
    fence = MD.parse(f":::{{admonition}} {e}\nbody\n:::\n")
    assert [t.type for t in fence] == ["colon_fence"]
    argument = fence[0].info.split(None, 1)[1]
    children = MD.parseInline(argument)[0].children
    assert [c.type for c in children] == ["text"] and children[0].content == visible(text)


@settings(max_examples=40, deadline=None)
@given(texts.filter(lambda t: t.strip() != ""))
def test_escaped_text_is_one_text_node_in_docutils(text):
    """Through MyST's docutils parser: a paragraph with one Text node, the text itself."""
    from docutils import nodes
    from docutils.core import publish_doctree
    from myst_parser.parsers.docutils_ import Parser

    doctree = publish_doctree(escape(text), parser=Parser(),
                              settings_overrides={"report_level": 5, "halt_level": 5, "myst_enable_extensions":
                                                  ["colon_fence", "deflist", "fieldlist"]})
    assert [type(n) for n in doctree.children] == [nodes.paragraph]
    assert [type(n) for n in doctree.children[0].children] == [nodes.Text]
    assert doctree.children[0].astext() == visible(text)
    assert not list(doctree.findall(nodes.raw)) and not list(doctree.findall(nodes.reference))


def _code_text(text: str) -> str:
    one_line = re.sub(r"\r\n|[\n\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]", " ", text)
    return visible(one_line)


@SETTINGS
@given(texts)
def test_a_code_span_shows_any_text_verbatim_on_one_line(text):
    c = code(text)
    if not _code_text(text):
        assert c == MISSING
        return
    tokens = MD.parse(f"x {c} y")
    children = tokens[1].children
    assert [ch.type for ch in children] == ["text", "code_inline", "text"], [(ch.type, ch.content) for ch in children]
    assert children[1].content == _code_text(text)
    cells = [t for t in MD.parse(markdown_table([{"h": c}])) if t.type == "inline"]
    assert [ch.type for ch in cells[1].children] == ["code_inline"] and cells[1].children[0].content == _code_text(text)


@SETTINGS
@given(st.text(st.one_of(st.characters(codec="utf-8", exclude_characters="\r\x00"),
                         st.sampled_from("`~:\n    ")), max_size=120))
def test_a_code_block_holds_any_text_verbatim(text):
    tokens = MD.parse(str(code_block(text, "toml")) + "after\n")
    assert tokens[0].type == "fence" and tokens[0].info == "toml"
    body = text.rstrip("\n")
    assert tokens[0].content == (body + "\n" if body else "")
    assert [t.type for t in tokens[1:]] == ["paragraph_open", "inline", "paragraph_close"]


# ------------------------------------------------------------------------------------------
# the video manifest

_hex = st.text("0123456789abcdef", min_size=64, max_size=64)
_name = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=20)
_rel = st.lists(st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=8), min_size=1,
                max_size=3).map(lambda parts: "/".join(parts) + ".mp4")
_entry = st.fixed_dictionaries(
    {"file": _rel, "sha256": _hex, "frames": st.integers(1, 10_000),
     "fps": st.one_of(st.integers(1, 120), st.floats(0.1, 240)), "resolution": st.lists(st.integers(1, 4096),
                                                                                        min_size=2, max_size=2),
     "url": st.one_of(st.just(""), st.just("https://cdn.example.org/v.mp4"))},
    optional={"experiment": _name, "run_id": _name, "config_hash": _hex, "bytes": st.integers(0, 10**9),
              "input": _name, "pose": _name, "prompt_source": _name})


@st.composite
def manifests(draw):
    ids = draw(st.lists(_name.filter(lambda s: s.strip()), min_size=0, max_size=5, unique=True))
    return [{"id": i, **draw(_entry)} for i in ids]


@SETTINGS
@given(manifests())
def test_valid_manifests_are_accepted_as_they_are(entries):
    copy = json.loads(json.dumps(entries))
    assert check_video_manifest(copy, "videos.json") == entries


WRONG = [None, True, -1, 0, 1.5, float("nan"), "", "x", [], [1], {}, {"a": 1}]


@st.composite
def broken_manifests(draw):
    """A valid manifest (at least one entry) with exactly one thing wrong."""
    entries = draw(manifests().filter(bool))
    i = draw(st.integers(0, len(entries) - 1))
    how = draw(st.sampled_from(["drop", "type", "unknown", "duplicate", "not-an-object", "not-a-list"]))
    if how == "drop":
        entries[i].pop(draw(st.sampled_from(sorted(REQUIRED))))
    elif how == "type":
        key = draw(st.sampled_from(sorted(set(REQUIRED) | set(OPTIONAL))))
        check = (REQUIRED.get(key) or OPTIONAL[key])[0]
        entries[i][key] = draw(st.sampled_from([w for w in WRONG if not check(w)]))
    elif how == "unknown":
        entries[i][draw(_name.filter(lambda k: k not in REQUIRED and k not in OPTIONAL))] = 1
    elif how == "duplicate":
        entries.append({**draw(_entry), "id": entries[i]["id"]})
    elif how == "not-an-object":
        entries[i] = draw(st.sampled_from([[], "entry", 3, None]))
    else:
        return {"entries": entries}
    return entries


@SETTINGS
@given(broken_manifests())
def test_invalid_manifests_are_refused_with_a_manifest_error(data):
    with pytest.raises(VideoManifestError) as err:
        check_video_manifest(data, "videos.json")
    assert str(err.value).startswith("videos.json: ") and "\n" not in str(err.value)


_json = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
                     lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(
                         st.sampled_from([*REQUIRED, *OPTIONAL, "other"]), inner, max_size=8)), max_leaves=20)


@SETTINGS
@given(_json)
def test_any_json_is_accepted_or_refused_with_a_manifest_error_never_a_traceback(data):
    try:
        check_video_manifest(data, "videos.json")
    except VideoManifestError as exc:
        assert "\n" not in str(exc)
