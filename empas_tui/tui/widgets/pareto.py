"""The Pareto scatter: memory (MiB) against predicted loss, drawn with textual-plot.

Layers, back to front: points that were on an earlier front (dim), the exact front of the proxy
(a line: the best any search can do on the proxy), baselines (llama.cpp's presets of a ggml study, at
their predicted loss), the current front (bright), the selected point.
A click selects the nearest front point.
"""

from __future__ import annotations

import numpy as np
from textual.events import Click
from textual_plot import HiResMode, NumericAxisFormatter, PlotWidget

from ..messages import PointClicked


class ParetoPlot(PlotWidget):
    def __init__(self, **kwargs) -> None:
        super().__init__(allow_pan_and_zoom=False, **kwargs)
        self.can_focus = False  # arrow keys belong to the front table next to it
        self.front_xy = np.zeros((0, 2))  # every front point, in the caller's order
        self.shown_xy = np.zeros((0, 2))  # the ones drawn (within y_max)

    def draw(self, front: np.ndarray, history: np.ndarray, exact: np.ndarray, selected: int | None,
             y_label: str, y_max: float | None = None, baselines: np.ndarray | None = None) -> None:
        """Each array is (n, 2) of (MiB, y); ``selected`` indexes ``front``. Points above ``y_max`` are
        left out (and the axes fit what remains), so a few ruined genomes do not flatten the curve.
        ``baselines`` are drawn where they fall inside the searched memory range."""
        baselines = np.zeros((0, 2)) if baselines is None else np.asarray(baselines, dtype=float).reshape(-1, 2)
        self.front_xy = front
        self.clear()
        if y_max is not None:
            keep = front[:, 1] <= y_max if len(front) else np.zeros(0, dtype=bool)
            if selected is not None and 0 <= selected < len(front) and not keep[selected]:
                selected = None
            index_map = np.cumsum(keep) - 1
            selected = None if selected is None else int(index_map[selected])
            front = front[keep]
            history = history[history[:, 1] <= y_max] if len(history) else history
            exact = exact[exact[:, 1] <= y_max] if len(exact) else exact
            baselines = baselines[baselines[:, 1] <= y_max] if len(baselines) else baselines
        self.shown_xy = front
        searched = [a for a in (front, history) if len(a)]
        if searched:
            # The axes fit what the search found; the exact front is drawn over that window only
            # (it reaches all-16-bit, which would squeeze the interesting part into a corner).
            xs = np.concatenate([a[:, 0] for a in searched])
            ys = np.concatenate([a[:, 1] for a in searched])
            pad_x = (xs.max() - xs.min()) * 0.03 or 1.0
            x0, x1 = float(xs.min() - pad_x), float(xs.max() + pad_x)
            if len(exact):
                exact = exact[(exact[:, 0] >= x0) & (exact[:, 0] <= x1)]
                room = 4 * max(self.size.width, 20)  # braille: 2 dots a cell; more points add nothing
                if len(exact) > room:
                    exact = exact[np.unique(np.linspace(0, len(exact) - 1, room).round().astype(int))]
                if len(exact):
                    ys = np.concatenate([ys, exact[:, 1]])
            if len(baselines):
                baselines = baselines[(baselines[:, 0] >= x0) & (baselines[:, 0] <= x1)]
                if len(baselines):
                    ys = np.concatenate([ys, baselines[:, 1]])
            lo, hi = float(ys.min()), float(ys.max())
            pad_y = (hi - lo) * 0.05 or 0.01
            y0, y1 = lo - pad_y, hi + pad_y
            self.set_xlimits(x0, x1)
            self.set_ylimits(y0, y1)
            # Few enough ticks that their labels never run into each other on a narrow plot.
            ticks = NumericAxisFormatter()
            width = max(self.size.width - self.margin_left, 10)
            height = max(self.size.height - self.margin_top - self.margin_bottom, 3)
            self.set_xticks(ticks.get_ticks(x0, x1, max_ticks=max(2, width // 10)))
            self.set_yticks(ticks.get_ticks(y0, y1, max_ticks=max(2, height // 3)))
        if len(history):
            self.scatter(history[:, 0], history[:, 1], marker="·", marker_style="grey50")
        if len(exact):
            self.plot(exact[:, 0], exact[:, 1], line_style="green", hires_mode=HiResMode.BRAILLE)
        if len(baselines) and searched:
            self.scatter(baselines[:, 0], baselines[:, 1], marker="✕", marker_style="bold dark_orange")
        if len(front):
            self.scatter(front[:, 0], front[:, 1], marker="●", marker_style="bold dodger_blue1")
        if selected is not None and 0 <= selected < len(front):
            self.scatter([front[selected, 0]], [front[selected, 1]], marker="◆", marker_style="bold magenta")
        self.set_xlabel("memory MiB")
        self.set_ylabel(y_label)

    def on_click(self, event: Click) -> None:
        if not len(self.shown_xy):
            return
        canvas = self.query_one("#plot")
        region = canvas.region
        px, py = event.screen_x - region.x, event.screen_y - region.y
        if not (0 <= px < region.width and 0 <= py < region.height):
            return
        pixels = np.array([self.get_pixel_from_coordinate(x, y) for x, y in self.shown_xy], dtype=float)
        d = (pixels[:, 0] - px) ** 2 + (2 * (pixels[:, 1] - py)) ** 2  # cells are twice as tall as wide
        nearest = self.shown_xy[int(np.argmin(d))]
        index = int(np.flatnonzero((self.front_xy == nearest).all(axis=1))[0])
        self.post_message(PointClicked(index))
