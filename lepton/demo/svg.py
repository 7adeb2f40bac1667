"""Small self-contained SVG charts for the demo's HTML report (no plotting library).

Each function returns one ``<svg>`` element as text: grouped bars and lines with axes,
value labels and a legend; ``None`` values are left out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from html import escape

PALETTE = ("#3b6ea8", "#e07b39", "#4f9d69", "#b5485d", "#8a6fb5", "#7f7f7f")
WIDTH, HEIGHT = 640, 300
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 36, 56


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * exp:
            return float(step * exp)
    return float(10 * exp)  # pragma: no cover


def _frame(title: str, y_max: float, fmt: Callable[[float], str], y_min: float = 0.0) -> list[str]:
    plot_h = HEIGHT - TOP - BOTTOM
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{escape(title)}" '
        'font-family="system-ui, sans-serif" font-size="11">'
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="#fff"/>',
        f'<text x="{WIDTH / 2}" y="18" text-anchor="middle" font-size="13" '
        f'font-weight="600">{escape(title)}</text>',
    ]
    for i in range(5):
        value = y_min + (y_max - y_min) * i / 4
        y = TOP + plot_h - plot_h * i / 4
        parts.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#555">'
            f"{escape(fmt(value))}</text>"
        )
    return parts


def _legend(names: Sequence[str]) -> list[str]:
    parts, x = [], LEFT
    for i, name in enumerate(names):
        color = PALETTE[i % len(PALETTE)]
        parts.append(
            f'<rect x="{x}" y="{HEIGHT - 16}" width="10" height="10" fill="{color}"/>'
            f'<text x="{x + 14}" y="{HEIGHT - 7}">{escape(name)}</text>'
        )
        x += 24 + 7 * len(name)
    return parts


def bar_chart(
    title: str,
    categories: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    *,
    fmt: Callable[[float], str] = lambda v: f"{v:g}",
    y_max: float | None = None,
) -> str:
    """Grouped vertical bars: one group per category, one bar per series."""
    values = [v for vs in series.values() for v in vs if v is not None]
    top = y_max if y_max is not None else _nice_max(max(values, default=0.0))
    parts = _frame(title, top, fmt)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    group_w = plot_w / max(1, len(categories))
    bar_w = group_w * 0.8 / max(1, len(series))
    for ci, cat in enumerate(categories):
        gx = LEFT + ci * group_w
        parts.append(
            f'<text x="{gx + group_w / 2:.1f}" y="{TOP + plot_h + 16}" '
            f'text-anchor="middle">{escape(cat)}</text>'
        )
        for si, (_, vs) in enumerate(series.items()):
            v = vs[ci] if ci < len(vs) else None
            if v is None:
                continue
            h = plot_h * min(v, top) / top
            x = gx + group_w * 0.1 + si * bar_w
            y = TOP + plot_h - h
            color = PALETTE[si % len(PALETTE)]
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w - 2:.1f}" height="{h:.1f}" '
                f'fill="{color}"><title>{escape(cat)}: {escape(fmt(v))}</title></rect>'
                f'<text x="{x + bar_w / 2 - 1:.1f}" y="{y - 3:.1f}" text-anchor="middle" '
                f'font-size="10">{escape(fmt(v))}</text>'
            )
    if len(series) > 1:
        parts += _legend(list(series))
    parts.append("</svg>")
    return "".join(parts)


def line_chart(
    title: str,
    xs: Sequence[float],
    series: Mapping[str, Sequence[float | None]],
    *,
    fmt: Callable[[float], str] = lambda v: f"{v:g}",
    x_label: str = "",
    y_min: float | None = None,
    y_max: float | None = None,
) -> str:
    """Lines with point markers over shared ``xs``."""
    values = [v for vs in series.values() for v in vs if v is not None]
    lo = y_min if y_min is not None else min(values, default=0.0)
    hi = y_max if y_max is not None else _nice_max(max(values, default=1.0))
    if hi <= lo:
        hi = lo + 1.0
    parts = _frame(title, hi, fmt, lo)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    x_lo, x_hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    span = (x_hi - x_lo) or 1.0

    def px(x: float) -> float:
        return LEFT + 10 + (plot_w - 20) * (x - x_lo) / span

    def py(y: float) -> float:
        return TOP + plot_h - plot_h * (min(max(y, lo), hi) - lo) / (hi - lo)

    for x in xs:
        parts.append(
            f'<text x="{px(x):.1f}" y="{TOP + plot_h + 16}" text-anchor="middle">{x:g}</text>'
        )
    if x_label:
        parts.append(
            f'<text x="{LEFT + plot_w / 2}" y="{TOP + plot_h + 32}" text-anchor="middle" '
            f'fill="#555">{escape(x_label)}</text>'
        )
    for si, (_, vs) in enumerate(series.items()):
        color = PALETTE[si % len(PALETTE)]
        points = [(px(x), py(v), v) for x, v in zip(xs, vs, strict=False) if v is not None]
        if len(points) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in points)
            parts.append(
                f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>'
            )
        for x, y, v in points:
            parts.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{color}">'
                f"<title>{escape(fmt(v))}</title></circle>"
                f'<text x="{x:.1f}" y="{y - 7:.1f}" text-anchor="middle" font-size="10">'
                f"{escape(fmt(v))}</text>"
            )
    parts += _legend(list(series))
    parts.append("</svg>")
    return "".join(parts)
