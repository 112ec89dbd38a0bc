"""Throttled redraws shared by the live screens (profile, search).

Workers post events far faster than a terminal over SSH can repaint; the screens only mark themselves
dirty and a timer calls :meth:`ThrottledRedraw._tick`, which repaints at most every
``REDRAW_SECONDS`` and backs off when a repaint itself is slow.
"""

from __future__ import annotations

import time

REDRAW_SECONDS = 0.25


class ThrottledRedraw:
    """Mixin: set ``self._dirty = True`` after a change; implement ``_redraw``; start the timer with
    ``self.set_interval(REDRAW_SECONDS, self._tick)``."""

    _dirty: bool = False
    _next_redraw: float = 0.0

    def _tick(self) -> None:
        """Redraw if something changed, at most every REDRAW_SECONDS, and never more than half the
        time (a slow terminal or a huge table backs off instead of starving the keyboard)."""
        now = time.monotonic()
        if not self._dirty or now < self._next_redraw:
            return
        self._redraw()
        cost = time.monotonic() - now
        self._next_redraw = time.monotonic() + max(0.0, cost - REDRAW_SECONDS)

    def _redraw(self) -> None:  # pragma: no cover - each screen implements it
        raise NotImplementedError
