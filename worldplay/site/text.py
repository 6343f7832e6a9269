"""Text is data: the one place where values from results, configs and manifests become Markdown.

The site's pages are MyST Markdown, and MyST turns much more than HTML into markup: roles
(``{raw}`...```), directives (a line of backticks or colons), links and images, autolinks,
table pipes, headings, quotes and list markers at the start of a line, and, through a newline,
any of these in a block of its own. So the render step never pastes a value into Markdown. It
writes its own markup as :class:`Markdown` (trusted: written by this package) and every value
goes through one of:

* :func:`escape` -- inline text: every ASCII punctuation character backslash-escaped (CommonMark
  shows them as themselves), line breaks, control characters and the whitespace at either end
  as character references. The result is one line that renders as exactly the original text,
  as a heading, a paragraph, a table cell or a directive title;
* :func:`code` -- an inline code span (one line; backtick runs in the value cannot close it);
* :func:`code_block` -- a fenced block, longer than any backtick run of the text;
* :func:`option` -- a directive option value (``:alt:``), which MyST does not parse: one line;
* :func:`html_attribute` -- a value inside the raw HTML of a ``{raw} html`` block (the video tag);
* :func:`bibtex_value` -- a value inside a BibTeX field.

:func:`md` formats a trusted template with escaped arguments, and :func:`join` joins parts;
both leave :class:`Markdown` parts alone, so pieces compose without being escaped twice. The
page writers (:mod:`.pages`, :mod:`.gallery`, :mod:`.tables`) build every page from these, so a
value that is forgotten gets escaped (and looks odd), never interpreted.
"""

from __future__ import annotations

import html
import re
import string
from collections.abc import Iterable
from typing import Any

MISSING = "—"
REPLACEMENT = "\N{REPLACEMENT CHARACTER}"
_PUNCTUATION = re.compile("[" + re.escape(string.punctuation) + "]")
# Line ends (for the Markdown parser, and for str.splitlines, with which MyST re-splits directive
# bodies) are written as character references; other control characters, which no page can show
# and which the parsers turn into U+FFFD anyway, become U+FFFD here.
_REFERENCED = re.compile(r"[\t\n\r\u2028\u2029]")
_INVISIBLE = re.compile(r"[\x00-\x08\x0b-\x0c\x0e-\x1f\x7f-\x9f]")
_EDGE_SPACE = re.compile(r"^\s+|\s+$")
# Line ends for the Markdown parser and for str.splitlines (MyST re-splits directive bodies so).
_LINE_BREAK = re.compile(r"\r\n|[\n\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")


class Markdown(str):
    """Markdown written by this package: trusted, never escaped again. Everything else is data.

    ``Markdown + Markdown`` is Markdown; adding a plain ``str`` on either side is a ``TypeError``
    (escape it, or wrap markup written here in ``Markdown(...)``), so data cannot slip in by
    concatenation."""

    __slots__ = ()

    def __add__(self, other: object) -> Markdown:
        if not isinstance(other, Markdown):
            raise TypeError(f"Markdown + {type(other).__name__}: escape() the value or wrap markup in Markdown()")
        return Markdown(str.__add__(self, other))

    def __radd__(self, other: object) -> Markdown:
        raise TypeError(f"{type(other).__name__} + Markdown: escape() the value or wrap markup in Markdown()")


def _reference(match: re.Match) -> str:
    return f"&#{ord(match.group())};"


def escape(value: Any) -> Markdown:
    """``value`` (any object, shown as ``str(value)``) as inline Markdown text that renders as
    exactly that text: no markup of any kind, on one line. Markdown passes through unchanged."""
    if isinstance(value, Markdown):
        return value
    text = "" if value is None else str(value)
    text = _INVISIBLE.sub(REPLACEMENT, _PUNCTUATION.sub(r"\\\g<0>", text))
    # Leading and trailing whitespace would be stripped (or indent a code block): reference it.
    text = _EDGE_SPACE.sub(lambda m: "".join(f"&#{ord(c)};" for c in m.group()), text)
    return Markdown(_REFERENCED.sub(_reference, text))


def md(template: str, *args: Any, **kwargs: Any) -> Markdown:
    """``template.format(*args, **kwargs)`` with every argument escaped (format specs apply to
    the value first: ``md("{:.1f} ms", x)``); :class:`Markdown` arguments are kept as they are.
    ``template`` is markup written in this package, never data."""
    return Markdown(_FORMATTER.vformat(template, args, kwargs))


class _EscapingFormatter(string.Formatter):
    def format_field(self, value: Any, format_spec: str) -> str:
        if isinstance(value, Markdown):
            if format_spec:
                raise ValueError(f"a format spec ({format_spec!r}) cannot apply to Markdown")
            return value
        return escape(format(value, format_spec))


_FORMATTER = _EscapingFormatter()


def join(separator: str, parts: Iterable[Any]) -> Markdown:
    """``separator`` (markup) between the parts, each escaped unless it is :class:`Markdown`."""
    return Markdown(separator.join(escape(p) for p in parts))


def code(value: Any, *, empty: str = MISSING) -> Markdown:
    """``value`` as an inline code span, shown verbatim on one line (line breaks become spaces,
    other control characters U+FFFD: a code span has no character references); ``empty``
    (markup) for an empty value."""
    text = _LINE_BREAK.sub(" ", "" if value is None else str(value))
    text = _INVISIBLE.sub(REPLACEMENT, text)
    if not text:
        return Markdown(empty)
    runs = {len(run) for run in re.findall("`+", text)}
    fence = next(n for n in range(1, len(runs) + 2) if n not in runs) * "`"
    # CommonMark strips one space at each end when both ends have one; a backtick at an end
    # would merge with the fence. A space on each side keeps both exactly.
    if text[0] == "`" or text[-1] == "`" or (text[0] == " " and text[-1] == " " and text.strip(" ")):
        text = f" {text} "
    return Markdown(f"{fence}{text}{fence}")


def code_block(text: str, info: str = "") -> Markdown:
    """``text`` verbatim in a fenced code block (``info``: markup such as ``toml`` or
    ``{raw} html``). Only at the top level of a page: a colon fence around it would end at a
    ``:::`` line of the text."""
    if "`" in info or "\n" in info:
        raise ValueError(f"code block info {info!r}: no backticks or line breaks")
    longest = max((len(run) for run in re.findall("`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    body = text.rstrip("\n")
    return Markdown(f"{fence}{info}\n{body}\n{fence}\n" if body else f"{fence}{info}\n{fence}\n")


def option(value: Any) -> str:
    """A directive option value (``:alt: ...``): MyST keeps it as plain text (docutils escapes
    it for HTML), so it only has to stay on one line."""
    return " ".join(str(value).split())


def html_attribute(value: Any) -> str:
    """``value`` inside a double-quoted HTML attribute of a raw HTML block: HTML-escaped, and
    with line breaks and backticks as character references so that it cannot end the block."""
    text = _INVISIBLE.sub(REPLACEMENT, html.escape(str(value), quote=True).replace("`", "&#96;"))
    return _REFERENCED.sub(_reference, text)


_LATEX_SPECIALS = {"\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "%": r"\%", "$": r"\$", "#": r"\#",
                   "&": r"\&", "_": r"\_", "^": r"\^{}", "~": r"\~{}"}
_LATEX = re.compile("|".join(map(re.escape, _LATEX_SPECIALS)))


def bibtex_value(value: Any) -> str:
    """``value`` inside a braced BibTeX field: one line, LaTeX specials escaped (an unbalanced
    brace would end the field)."""
    return _LATEX.sub(lambda m: _LATEX_SPECIALS[m.group()], " ".join(str(value).split()))


__all__ = ["MISSING", "Markdown", "bibtex_value", "code", "code_block", "escape", "html_attribute", "join", "md",
           "option"]
