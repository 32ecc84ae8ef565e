"""SVG and HTML pieces drawn on the server: the timeline, throughput and progress bar.

Colours are attributes, not a stylesheet's, so the same pieces show alike on
the dashboard and inline in a notebook (:mod:`.status`). Each task mark is a
``rect`` of class ``task`` and its look (``done``, ``failed``, ``lost``...)
carrying ``data-task``, the task's index; lanes are ``text`` of class ``lane``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from html import escape

from ..progress import TASK_STATE_WORDS
from ..store import TaskState
from .data import TIME_BINS, Timeline

__all__ = ["COLOURS", "progress_html", "throughput_svg", "timeline_svg"]

#: One colour per look, shared by every piece.
COLOURS = {
    "done": "#3a9a4a",
    "running": "#3b74c4",
    "failed": "#d23c3c",
    "lost": "#e08a1e",
    "cancelled": "#8a8a8a",
    "pending": "#d8d8d8",
}
WIDTH = 960
LABEL_W = 190
PLOT_W = WIDTH - LABEL_W - 10
AXIS_H = 24


def _seconds(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 120:
        return f"{s / 60:.0f} min"
    return f"{s:.3g} s"


def _axis(start_y: float, span_s: float) -> list[str]:
    """Ticks at round steps (1, 2 or 5 times a power of ten) of the unit that suits the span."""
    unit, per = (("h", 3600.0) if span_s >= 3 * 3600 else ("min", 60.0) if span_s >= 180
                 else ("s", 1.0))
    span = span_s / per
    step = 10 ** math.floor(math.log10(span / 5)) if span > 0 else 1.0
    step = next(step * m for m in (1, 2, 5, 10) if span / (step * m) <= 6)
    parts = [f'<line x1="{LABEL_W}" y1="{start_y}" x2="{LABEL_W + PLOT_W}" y2="{start_y}" '
             'stroke="#999"/>']
    for i in range(int(span / step) + 1):
        x = LABEL_W + PLOT_W * (i * step) / span
        anchor = "start" if i == 0 else "middle"
        parts.append(f'<line x1="{x:.1f}" y1="{start_y}" x2="{x:.1f}" y2="{start_y + 4}" '
                     f'stroke="#999"/><text x="{x:.1f}" y="{start_y + 16}" font-size="11" '
                     f'text-anchor="{anchor}" fill="#444">{i * step:g} {unit}</text>')
    return parts


def _x(t: float, tl: Timeline) -> float:
    return LABEL_W + PLOT_W * (t - tl.start) / (tl.end - tl.start)


def timeline_svg(tl: Timeline) -> str:
    """The tasks of a request by lane, from lease to result; failures and lost tasks marked."""
    if not tl.lanes:
        return '<p class="empty">No task has been leased yet.</p>'
    lane_h = 16.0 if len(tl.lanes) <= 30 else max(7.0, 480 / len(tl.lanes))
    height = lane_h * len(tl.lanes) + AXIS_H + 4
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="timeline" width="{WIDTH}" '
             f'height="{height:.0f}" viewBox="0 0 {WIDTH} {height:.0f}" '
             f'data-binned="{str(tl.binned).lower()}" data-tasks="{tl.n_drawn}" '
             'font-family="sans-serif">']
    peak = max((max(lane.busy, default=0) for lane in tl.lanes), default=0) or 1
    for row, lane in enumerate(tl.lanes):
        y = row * lane_h
        if row % 2:
            parts.append(f'<rect x="0" y="{y:.1f}" width="{WIDTH}" height="{lane_h:.1f}" '
                         'fill="#f4f4f4"/>')
        size = min(11.0, lane_h - 2)
        parts.append(f'<text class="lane" x="{LABEL_W - 6}" y="{y + lane_h / 2 + size / 3:.1f}" '
                     f'font-size="{size:.0f}" text-anchor="end" fill="#222">'
                     f'{escape(lane.name[-30:])}</text>')
        top, h = y + 1.5, lane_h - 3
        for begin, finish, look, idx in lane.marks:
            x = _x(begin, tl)
            w = max(1.5, _x(finish, tl) - x)
            parts.append(
                f'<rect class="task {look}" data-task="{idx}" data-lane="{escape(lane.name)}" '
                f'x="{x:.1f}" y="{top:.1f}" '
                f'width="{w:.1f}" height="{h:.1f}" fill="{COLOURS[look]}">'
                f'<title>task {idx}: {look}, {_seconds(finish - begin)} on '
                f'{escape(lane.name)}</title></rect>')
        parts += _binned_lane(lane.busy, lane.failures, peak, tl, top, h)
    parts += _axis(lane_h * len(tl.lanes) + 2, tl.end - tl.start)
    parts.append("</svg>")
    return "".join(parts)


def _binned_lane(busy: list[int], failures: Mapping[str, list[int]], peak: int,
                 tl: Timeline, top: float, h: float) -> list[str]:
    """Runs of bins with the same shade of running tasks, then a tick per failing bin."""
    parts = []
    bin_w = PLOT_W / TIME_BINS
    levels = [0 if n == 0 else 1 + (7 * n) // peak for n in busy]
    i = 0
    while i < len(levels):
        j = i
        while j + 1 < len(levels) and levels[j + 1] == levels[i]:
            j += 1
        if levels[i]:
            top_n = max(busy[i:j + 1])
            parts.append(
                f'<rect class="busy" x="{LABEL_W + i * bin_w:.1f}" y="{top:.1f}" '
                f'width="{(j - i + 1) * bin_w:.1f}" height="{h:.1f}" fill="{COLOURS["done"]}" '
                f'fill-opacity="{levels[i] / 8:.2f}"><title>up to {top_n} tasks running'
                '</title></rect>')
        i = j + 1
    for look, counts in failures.items():
        for k, n in enumerate(counts):
            if n:
                parts.append(
                    f'<rect class="mark {look}" x="{LABEL_W + k * bin_w:.1f}" y="{top:.1f}" '
                    f'width="{max(2.0, bin_w):.1f}" height="{h:.1f}" fill="{COLOURS[look]}">'
                    f'<title>{n} {look} near {_seconds(k * tl.bin_s)}</title></rect>')
    return parts


def throughput_svg(tl: Timeline) -> str:
    """Finished tasks per time bin, stacked by how they ended."""
    if not tl.throughput:
        return '<p class="empty">No task has finished yet.</p>'
    plot_h = 110.0
    looks = [look for look in ("done", "failed", "lost", "cancelled") if look in tl.throughput]
    totals = [sum(tl.throughput[look][k] for look in looks) for k in range(TIME_BINS)]
    peak = max(totals) or 1
    height = plot_h + AXIS_H + 6
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="throughput" width="{WIDTH}" '
             f'height="{height:.0f}" viewBox="0 0 {WIDTH} {height:.0f}" '
             'font-family="sans-serif">',
             f'<text x="{LABEL_W - 6}" y="12" font-size="11" text-anchor="end" fill="#444">'
             f'{peak} per {_seconds(tl.bin_s)}</text>',
             f'<text x="{LABEL_W - 6}" y="{plot_h}" font-size="11" text-anchor="end" '
             'fill="#444">0</text>']
    bin_w = PLOT_W / TIME_BINS
    for k in range(TIME_BINS):
        base = plot_h + 2
        for look in looks:
            n = tl.throughput[look][k]
            if not n:
                continue
            h = plot_h * n / peak
            base -= h
            parts.append(f'<rect class="tp {look}" x="{LABEL_W + k * bin_w:.1f}" '
                         f'y="{base:.1f}" width="{max(1.0, bin_w - 0.5):.1f}" height="{h:.1f}" '
                         f'fill="{COLOURS[look]}"><title>{n} {look}</title></rect>')
    parts += _axis(plot_h + 2, tl.end - tl.start)
    parts.append("</svg>")
    return "".join(parts)


def progress_html(counts: Mapping[str, int], total: int) -> str:
    """A bar of the tasks by state, done first, with the counts beside it."""
    order = (TaskState.DONE, TaskState.ERROR, TaskState.CANCELLED, TaskState.LEASED,
             TaskState.PENDING)
    bar = []
    legend = []
    for state in order:
        look = TASK_STATE_WORDS[state]
        n = counts.get(state, 0)
        if total and n:
            bar.append(f'<span class="seg {look}" style="display:inline-block;height:14px;'
                       f'width:{100 * n / total:.3f}%;background:{COLOURS[look]}"></span>')
        legend.append(f'<span class="count {look}" data-state="{state}">'
                      f'<b style="color:{COLOURS[look]}">&#9632;</b> {look} '
                      f'<span class="n">{n}</span></span>')
    return ('<div class="progress" style="width:100%;max-width:960px;background:#eee;'
            'line-height:0;white-space:nowrap;overflow:hidden">' + "".join(bar) + "</div>"
            '<div class="legend" style="font-family:sans-serif;font-size:13px;margin:4px 0">'
            + " &nbsp; ".join(legend) + f" &nbsp; of <b>{total}</b></div>")
