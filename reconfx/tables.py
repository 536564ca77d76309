"""Tables as text: aligned columns for the terminal, Markdown for report.md."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "for_terminal", "markdown_table", "table"
]


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns aligned with two spaces between them, under a dashed rule."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]
    line = lambda cells: "  ".join(  # noqa: E731
        str(c).ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown (GitHub) table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def for_terminal(lines: Sequence[str]) -> list[str]:
    """report.md lines as a terminal shows them: a heading as a line of its own, each Markdown
    table as aligned columns (see :func:`table`), code backticks dropped, empty lines left
    out."""
    out: list[str] = []
    rows: list[list[str]] = []

    def flush() -> None:
        if rows:
            out.extend("  " + line for line in table(rows[0], rows[1:]).splitlines())
            rows.clear()

    for line in (part for text in lines for part in text.splitlines()):
        if line.startswith("|"):
            cells = [c.strip().replace("`", "") for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= {"-", ":"} for c in cells):  # (not the separator row)
                rows.append(cells)
            continue
        flush()
        if line.strip():
            out.append(line.lstrip("#").strip() + ":" if line.startswith("#")
                       else line.replace("`", ""))
    flush()
    return out
