"""Tables of results as Markdown (paper-ready LaTeX and plots build on the same rows)."""

from __future__ import annotations

from typing import Any, Sequence


def human_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n}"


def human_count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, Any]]) -> str:
    """``columns``: (header, key path like ``metrics.test.accuracy``, formatter)."""

    def get(row, path):
        for part in path.split("."):
            row = row.get(part) if isinstance(row, dict) else None
        return row

    header = "| " + " | ".join(h for h, _, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = []
    for row in rows:
        cells = []
        for _, path, fmt in columns:
            value = get(row, path)
            cells.append("n/a" if value is None else fmt(value))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([header, rule, *body])
