"""The one table renderer: rows of cells as Markdown (sweep results, frontiers, trials,
nightly reports) or as an HTML table (the nightly report's page)."""

from __future__ import annotations

import html as escape


def markdown(headers: list[str], rows: list[list[str]], align: str = "") -> str:
    """A Markdown table; ``align`` gives each column ``l`` (the default) or ``r``."""
    align = align.ljust(len(headers), "l")
    lines = ["| " + " | ".join(headers) + " |", "|" + "".join("---:|" if a == "r" else "---|" for a in align)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def html(headers: list[str], rows: list[list[str]], row_classes: list[str] | None = None) -> str:
    """An HTML table, every cell escaped; ``row_classes`` names each row's CSS class."""
    classes = row_classes or [""] * len(rows)
    head = "".join(f"<th>{escape.escape(h)}</th>" for h in headers)
    body = "".join(
        f"<tr class='{escape.escape(cls)}'>" + "".join(f"<td>{escape.escape(cell)}</td>" for cell in row) + "</tr>"
        for row, cls in zip(rows, classes)
    )
    return f"<table><tr>{head}</tr>{body}</table>"
