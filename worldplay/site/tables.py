"""pandas -> MyST Markdown tables (pipe tables, optionally inside a captioned ``{table}``).

Formatting is explicit and deterministic: floats by a per-column format (default ``{:.4g}``),
missing values as an em dash, ``|`` escaped, newlines flattened. No third-party table
formatter is needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd

Formatter = str | Callable[[Any], str]
MISSING = "—"


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
        text = str(value)
    return text.replace("\r", " ").replace("\n", " ").replace("|", "\\|")


def markdown_table(
    df: pd.DataFrame,
    *,
    formats: Mapping[str, Formatter] | None = None,
    align: Mapping[str, str] | None = None,
    caption: str | None = None,
    name: str | None = None,
) -> str:
    """A pipe table of ``df`` (index ignored; reset it first if it matters).

    ``formats`` maps a column to a format string (``"{:.1f}"``) or a callable; ``align`` maps a
    column to ``"l"``, ``"r"`` or ``"c"`` (default: right for numeric columns, left otherwise).
    With ``caption`` the table is wrapped in a MyST ``{table}`` directive (``name`` = its label).
    """
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
    for row in df.itertuples(index=False, name=None):
        cells = [_cell(v, formats.get(str(c))) for c, v in zip(df.columns, row, strict=True)]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    if caption is None:
        return table + "\n"
    opts = f":name: {name}\n" if name else ""
    return f":::{{table}} {caption}\n{opts}:align: left\n\n{table}\n:::\n"


def key_value_table(rows: list[tuple[str, Any]], *, caption: str | None = None, name: str | None = None,
                    headers: tuple[str, str] = ("field", "value")) -> str:
    """A two-column table from ``(key, value)`` pairs; values are shown as given (strings)."""
    df = pd.DataFrame([(k, "" if v is None else str(v)) for k, v in rows], columns=list(headers))
    return markdown_table(df, caption=caption, name=name, align={headers[0]: "l", headers[1]: "l"})


def code(text: Any) -> str:
    """Inline code for a table cell (backticks inside are replaced, not escaped)."""
    text = str(text).replace("`", "'")
    return f"`{text}`" if text else MISSING


__all__ = ["code", "key_value_table", "markdown_table"]
