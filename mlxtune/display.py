"""How results show themselves: a readable summary in a terminal, a small HTML table in a notebook.

`TrainResult`, `EvalResult`, `Comparison` and `FuseResult` build their `__repr__` and `_repr_html_` from the
helpers here, so a result left as the last line of a notebook cell is a table and the same value printed in
a terminal is a few aligned lines. The one thing to know: every value goes through `html.escape`; a file
name or a model's reply is data, never markup.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

STYLE = ("border-collapse:collapse;font-variant-numeric:tabular-nums", "text-align:left;padding:2px 10px 2px 0",
         "text-align:right;padding:2px 10px")


def fields_text(title: str, rows: Sequence[tuple[str, object]]) -> str:
    """`title` then one `name: value` line per row, the values aligned; rows whose value is None are left out."""
    rows = [(k, str(v)) for k, v in rows if v is not None]
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join([title] + [f"  {k + ':':<{width + 1}} {v}" for k, v in rows])


def fields_html(title: str, rows: Sequence[tuple[str, object]]) -> str:
    """A two-column table (name, value) under a bold `title`; rows whose value is None are left out."""
    body = "".join(f"<tr><th style='{STYLE[1]}'>{html.escape(k)}</th><td style='{STYLE[1]}'>{html.escape(str(v))}</td></tr>"
                   for k, v in rows if v is not None)
    return f"<div><b>{html.escape(title)}</b><table style='{STYLE[0]}'>{body}</table></div>"


def table_html(head: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None,
               numbers: bool = True) -> str:
    """A table with a header row; the first column left-aligned, the others right-aligned when they are `numbers`."""
    def cells(tag: str, values) -> str:
        return "".join(f"<{tag} style='{STYLE[2] if i and numbers else STYLE[1]}'>{html.escape(str(v))}</{tag}>"
                       for i, v in enumerate(values))

    rows_html = "".join(f"<tr>{cells('td', r)}</tr>" for r in rows)
    caption = f"<b>{html.escape(title)}</b>" if title else ""
    return f"<div>{caption}<table style='{STYLE[0]}'><tr>{cells('th', head)}</tr>{rows_html}</table></div>"


def pct(x: float | None) -> str | None:
    return None if x is None else f"{x:.1%}"


def num(x: float | None, digits: int = 3) -> str | None:
    return None if x is None else f"{x:.{digits}f}"
