"""Small line charts as SVG, inline in markdown artifacts (the Prefect UI shows `data:` images; it
cannot fetch `s3://` or local paths)."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from html import escape

WIDTH, HEIGHT, MARGIN = 640, 220, 44
COLOURS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea")


def line_chart_svg(x: Sequence[float], lines: dict[str, Sequence[float]], title: str, x_label: str = "s") -> str:
    """One SVG with a line per entry of `lines` over `x`, each scaled to its own maximum (the
    legend gives that maximum), so series of different units share one chart."""
    plot_w, plot_h = WIDTH - 2 * MARGIN, HEIGHT - 2 * MARGIN
    x_max = max(x, default=0) or 1.0
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="11">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{MARGIN}" y="16" font-size="13">{escape(title)}</text>',
        f'<line x1="{MARGIN}" y1="{HEIGHT - MARGIN}" x2="{WIDTH - MARGIN}" y2="{HEIGHT - MARGIN}" stroke="#999"/>',
        f'<text x="{WIDTH - MARGIN}" y="{HEIGHT - MARGIN + 16}" text-anchor="end">{x_max:g} {escape(x_label)}</text>',
        f'<text x="{MARGIN}" y="{HEIGHT - MARGIN + 16}">0</text>',
    ]
    for index, (name, values) in enumerate(lines.items()):
        colour = COLOURS[index % len(COLOURS)]
        top = max(values, default=0) or 1.0
        points = " ".join(
            f"{MARGIN + plot_w * xv / x_max:.1f},{HEIGHT - MARGIN - plot_h * v / top:.1f}"
            for xv, v in zip(x, values, strict=False)
        )
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{points}"/>')
        parts.append(f'<text x="{MARGIN + 150 * index}" y="32" fill="{colour}">{escape(name)} (max {top:,.0f})</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_markdown(alt: str, svg: str) -> str:
    """A markdown image of `svg`, inline as a data URL."""
    return f"![{alt}](data:image/svg+xml;base64,{base64.b64encode(svg.encode()).decode()})"
