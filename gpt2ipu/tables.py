"""Small tables as Markdown (for terminals, READMEs) and as a standalone HTML page (for the report).

The Snakemake report shows HTML files inline and offers every other file as a download, so each
table the report shows is written as a self-contained HTML page; the Markdown form of the same
rows is what a terminal or a README reads.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

Row = Sequence[Any]


def cell_text(value: Any) -> str:
    """A table cell: floats to four significant digits, None as a dash, the rest as str()."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Row]) -> str:
    """A GitHub-flavoured Markdown table (| a | b |), pipes in cells escaped."""

    def line(cells):
        return "| " + " | ".join(cell_text(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), "|" + "---|" * len(headers), *(line(row) for row in rows)]) + "\n"


def html_table(headers: Sequence[str], rows: Sequence[Row], caption: str | None = None) -> str:
    """One <table> element (escaped text; numbers right-aligned)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(
            f'<td class="num">{html.escape(cell_text(c))}</td>'
            if isinstance(c, (int, float)) and not isinstance(c, bool)
            else f"<td>{html.escape(cell_text(c))}</td>" for c in row) + "</tr>"
        for row in rows)
    title = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{title}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em 0; }
caption { text-align: left; font-weight: bold; padding-bottom: 0.3em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { white-space: pre-wrap; background: #f7f7f7; padding: 0.5em; }
"""


def html_page(title: str, *parts: str) -> str:
    """A self-contained HTML page: a heading and the given HTML fragments (tables, paragraphs)."""
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{PAGE_STYLE}</style></head>\n<body><h2>{html.escape(title)}</h2>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def paragraph(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"
