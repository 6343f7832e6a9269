"""pandas -> MyST Markdown tables (pipe tables, optionally inside a captioned ``{table}``).

Formatting is explicit and deterministic: floats by a per-column format (default ``{:.4g}``),
missing values as an em dash. Every header, cell and caption is data, escaped by
:func:`worldplay.site.text.escape` unless it is already :class:`~worldplay.site.text.Markdown`
(a code span, a link written by the page). No third-party table formatter is needed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd

from .text import MISSING, Markdown, escape

Formatter = str | Callable[[Any], str]


def _cell(value: Any, fmt: Formatter | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if callable(fmt):
        text = fmt(value)
    elif fmt is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        text = fmt.format(value)
    elif isinstance(value, float):
        text = f"{value:.4g}"
    else:
        text = value
    # The table splits rows at every '|' that no backslash precedes, and takes one backslash
    # off each '\|' before the cell is parsed: so every pipe of the cell's Markdown (escaped
    # text, code spans) gets one, and the cell reads as that Markdown again.
    return escape(text).replace("|", "\\|")


def markdown_table(
    data: pd.DataFrame | Sequence[Mapping[str, Any]],
    *,
    formats: Mapping[str, Formatter] | None = None,
    align: Mapping[str, str] | None = None,
    caption: str | None = None,
    name: str | None = None,
) -> str:
    """A pipe table of ``data``: a DataFrame (index ignored; reset it first if it matters) or
    rows as dicts (columns in first-seen order, typed as ``pd.DataFrame(rows)`` types them).
    Cells that are :class:`~worldplay.site.text.Markdown` are kept as such: pass rows (not a
    DataFrame) when there are any, since pandas may store strings in a way that drops the type.

    ``formats`` maps a column to a format string (``"{:.1f}"``) or a callable; ``align`` maps a
    column to ``"l"``, ``"r"`` or ``"c"`` (default: right for numeric columns, left otherwise).
    With ``caption`` the table is wrapped in a MyST ``{table}`` directive (``name`` = its label).
    """
    rows = None if isinstance(data, pd.DataFrame) else list(data)
    df = data if rows is None else pd.DataFrame(rows)
    formats = dict(formats or {})
    align = dict(align or {})
    columns = [str(c) for c in df.columns]
    header = "| " + " | ".join(_cell(c, None) for c in columns) + " |"
    rule = []
    for col in df.columns:
        side = align.get(str(col)) or ("r" if pd.api.types.is_numeric_dtype(df[col]) and
                                       not pd.api.types.is_bool_dtype(df[col]) else "l")
        rule.append({"l": ":--", "r": "--:", "c": ":-:"}[side])
    lines = [header, "| " + " | ".join(rule) + " |"]
    for i, row in enumerate(df.itertuples(index=False, name=None)):
        given = rows[i] if rows is not None else {}
        cells = [_cell(given[c] if isinstance(given.get(c), Markdown) else v, formats.get(str(c)))
                 for c, v in zip(df.columns, row, strict=True)]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    if caption is None:
        return Markdown(table + "\n")
    opts = f":name: {_label(name)}\n" if name else ""
    return Markdown(f":::{{table}} {escape(caption)}\n{opts}:align: left\n\n{table}\n:::\n")


def _label(name: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        raise ValueError(f"table label {name!r}: lower-case letters, digits and '-' only")
    return name


def key_value_table(rows: list[tuple[str, Any]], *, caption: str | None = None, name: str | None = None,
                    headers: tuple[str, str] = ("field", "value")) -> str:
    """A two-column table from ``(key, value)`` pairs: values are escaped unless they are
    :class:`~worldplay.site.text.Markdown`."""
    table = [{headers[0]: k, headers[1]: "" if v is None else v} for k, v in rows]
    return markdown_table(table, caption=caption, name=name, align={headers[0]: "l", headers[1]: "l"})


__all__ = ["key_value_table", "markdown_table"]
