"""Inline SVG charts, small enough to resend a few times a second in an HTML widget."""

from __future__ import annotations

import html
from collections import deque


class History:
    """The last `seconds` of a value, one point per second (the latest value seen in it).

    Points are per second, not per sample, so the chart only moves when a value
    does or a second passes, and an idle minute settles into a flat line that
    needs no more updates.
    """

    def __init__(self, now: float, seconds: int = 60):
        self.values: deque[float] = deque([0.0] * seconds, maxlen=seconds)
        self._second = int(now)

    def add(self, now: float, value: float) -> None:
        second = int(now)
        # Seconds nobody sampled (a late tick) take the new value.
        for _ in range(min(second - self._second, len(self.values))):
            self.values.append(value)
        self._second = max(second, self._second)
        self.values[-1] = value


def sparkline(values, width: int = 180, height: int = 28, color: str = "#1f77b4") -> str:
    """A polyline of `values`, scaled to their maximum, with a faint baseline."""
    values = list(values)
    top = max(values, default=0.0) or 1.0
    step = (width - 2) / max(len(values) - 1, 1)
    points = " ".join(f"{1 + i * step:.1f},{height - 1 - v / top * (height - 2):.1f}"
                      for i, v in enumerate(values))
    return (f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
            f'<line x1="0" y1="{height - 1}" x2="{width}" y2="{height - 1}" stroke="#ddd"/>'
            f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="1.5"/></svg>')


def bar_chart(fractions, labels, bar: int = 40, height: int = 48, color: str = "#2ca02c") -> str:
    """Vertical bars for values in [0, 1], each with its label and percentage underneath."""
    plot = height - 14  # the bottom 14 px hold the labels
    parts = []
    for i, (f, label) in enumerate(zip(fractions, labels)):
        f = min(max(f, 0.0), 1.0)
        x = i * (bar + 6)
        parts.append(
            f'<rect x="{x}" y="{plot * (1 - f):.1f}" width="{bar}" height="{plot * f:.1f}" fill="{color}">'
            f"<title>{html.escape(label)}: {f:.0%}</title></rect>"
            f'<text x="{x + bar / 2}" y="{height - 2}" font-size="10" text-anchor="middle">'
            f"{html.escape(label)} {f:.0%}</text>")
    width = max(len(parts) * (bar + 6), 1)
    return f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}">{"".join(parts)}</svg>'
