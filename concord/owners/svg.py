"""Small server-side SVG plots (bars and lines) for the owners' pages: no chart library, no script."""

from __future__ import annotations

import html
from collections.abc import Sequence

PALETTE = ("#2f6fb0", "#d9822b", "#3a9a5b", "#b34d6d", "#7a5cb3", "#6b7b8c")


def _num(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".")


def bars(title: str, items: Sequence[tuple[str, float]], fmt: str = "{:,.0f}", width: int = 520,
         plot_id: str = "") -> str:
    """Horizontal bars, one per (label, value), largest first as given; an empty plot says it has no data."""
    row, label_w = 24, 170
    height = max(1, len(items)) * row + 30
    top = max((v for _, v in items), default=0) or 1
    out = [f'<svg class=plot{f" id={plot_id}" if plot_id else ""} role=img viewBox="0 0 {width} {height}" '
           f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg"><title>{html.escape(title)}</title>']
    if not items:
        out.append('<text x="10" y="20" class=empty>no data</text>')
    for i, (label, value) in enumerate(items):
        y = 10 + i * row
        w = (width - label_w - 90) * (value / top)
        out.append(f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end">{html.escape(label)}</text>'
                   f'<rect class=bar x="{label_w}" y="{y + 3}" width="{_num(max(w, 1))}" height="{row - 8}" '
                   f'fill="{PALETTE[i % len(PALETTE)]}"><title>{html.escape(label)}: {fmt.format(value)}</title></rect>'
                   f'<text x="{_num(label_w + max(w, 1) + 6)}" y="{y + 15}">{html.escape(fmt.format(value))}</text>')
    out.append("</svg>")
    return "".join(out)


def lines(title: str, labels: Sequence[str], series: Sequence[tuple[str, Sequence[float]]], width: int = 520,
          height: int = 200, plot_id: str = "") -> str:
    """One polyline per (name, values) over shared x labels, with a legend and the y axis' maximum."""
    left, right, top, bottom = 40, 10, 24, 30
    n = max(1, len(labels) - 1)
    peak = max((v for _, vs in series for v in vs), default=0) or 1
    w, h = width - left - right, height - top - bottom
    out = [f'<svg class=plot{f" id={plot_id}" if plot_id else ""} role=img viewBox="0 0 {width} {height}" '
           f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg"><title>{html.escape(title)}</title>',
           f'<line x1="{left}" y1="{top + h}" x2="{left + w}" y2="{top + h}" stroke="#999"/>'
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + h}" stroke="#999"/>'
           f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{_num(peak)}</text>'
           f'<text x="{left - 4}" y="{top + h}" text-anchor="end">0</text>']
    step = max(1, len(labels) // 7)
    shown = list(range(0, len(labels), step))
    if shown and shown[-1] != len(labels) - 1:  # the latest day is always labelled, never crowding its neighbour
        shown[-1 if len(labels) - 1 - shown[-1] < step else len(shown):] = [len(labels) - 1]
    for i, label in enumerate(labels):
        if i in shown:
            out.append(f'<text x="{_num(left + w * i / n)}" y="{height - 10}" text-anchor="middle">'
                       f"{html.escape(label)}</text>")
    for k, (name, values) in enumerate(series):
        color = PALETTE[k % len(PALETTE)]
        pts = " ".join(f"{_num(left + w * i / n)},{_num(top + h - h * v / peak)}" for i, v in enumerate(values))
        out.append(f'<polyline class=series fill="none" stroke="{color}" stroke-width="2" points="{pts}">'
                   f"<title>{html.escape(name)}</title></polyline>"
                   f'<rect x="{left + 10 + k * 150}" y="6" width="10" height="10" fill="{color}"/>'
                   f'<text x="{left + 24 + k * 150}" y="15">{html.escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)
