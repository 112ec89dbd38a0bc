"""Output helpers shared by CLI commands: JSON, progress bars and pipe progress lines (options: options.py)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, allow_nan=False, default=_json_default)
    sys.stdout.write("\n")


def _json_default(o):
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


#: Seconds between progress lines when stderr is not a terminal (a pipe, a log file, CI);
#: ``EMPAS_PROGRESS_INTERVAL`` overrides it.
PIPE_INTERVAL_SECONDS = 30.0


def pipe_interval() -> float:
    try:
        value = float(os.environ.get("EMPAS_PROGRESS_INTERVAL", PIPE_INTERVAL_SECONDS))
    except ValueError:
        return PIPE_INTERVAL_SECONDS
    return value if value > 0 else PIPE_INTERVAL_SECONDS


def format_duration(seconds: float | None) -> str:
    """12s, 3m05s, 1h02m: short enough for a progress line."""
    if seconds is None:
        return "?"
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class ProgressBar:
    """Progress of a long job on stderr, for headless runs (no dependency, safe in pipes).

    On a terminal: one line redrawn in place, whose elapsed time ticks every second even while one
    step takes long, and whose ETA counts down between steps. Elsewhere (a pipe, a log file): one
    plain line every ``interval`` seconds, so a long job is never silent. The ETA is the job's own
    (measured cost of what is done, applied to what is left), never invented here."""

    def __init__(self, label: str, enabled: bool = True, stream=None, interval: float | None = None,
                 clock=time.monotonic):
        stream = stream or sys.stderr
        self.label, self.stream, self.clock = label, stream, clock
        self.interval = pipe_interval() if interval is None else float(interval)
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.enabled = enabled
        self.started = clock()
        self._last = -1.0
        self._state: tuple[int, int, str, float | None, float] | None = None  # done, total, suffix, eta, when
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_line = self.started

    def update(self, done: int, total: int, suffix: str = "", eta: float | None = None) -> None:
        if not self.enabled or total <= 0 or self._stop.is_set():
            return
        with self._lock:
            self._state = (done, total, suffix, eta, self.clock())
        self._start_ticker()
        if not self.tty:
            return
        frac = done / total
        if frac - self._last < 0.005 and done != total:
            return
        self._last = frac
        self._draw()

    def elapsed(self) -> float:
        return self.clock() - self.started

    def line(self) -> str:
        """The progress as text: label, count, elapsed, ETA (counting down since the last step)."""
        with self._lock:
            state = self._state
        if state is None:
            return f"{self.label}: elapsed {format_duration(self.elapsed())}"
        done, total, suffix, eta, when = state
        left = None if eta is None else max(eta - (self.clock() - when), 0.0)
        eta_text = f" ETA {format_duration(left)}" if left is not None else ""
        if self.tty:
            width = 30
            filled = int(width * done / total)
            return (f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
                    f"{format_duration(self.elapsed())}{eta_text} {suffix[:30]:30}")
        return (f"{self.label}: {done}/{total} ({100.0 * done / total:.0f}%), elapsed "
                f"{format_duration(self.elapsed())}{eta_text}{'  ' + suffix if suffix else ''}")

    def tick(self) -> None:
        """Redraw (terminal) or, once ``interval`` has passed since the last line, print one (pipe)."""
        if not self.enabled or self._stop.is_set() or self._state is None:
            return
        if self.tty:
            self._draw()
            return
        now = self.clock()
        if now - self._last_line >= self.interval:
            self._last_line = now
            self._write(self.line() + "\n")

    def _draw(self) -> None:
        self._write(self.line())

    def _write(self, text: str) -> None:
        with self._lock:
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):  # a closed pipe must not kill the job
                pass

    def _start_ticker(self) -> None:
        if self._thread is not None:
            return
        period = min(1.0, self.interval) if not self.tty else 1.0
        self._thread = threading.Thread(target=self._run, args=(period,), name=f"progress-{self.label}", daemon=True)
        self._thread.start()

    def _run(self, period: float) -> None:
        while not self._stop.wait(period):
            self.tick()

    def close(self) -> None:
        """Stop the ticker and end the terminal line; later calls do nothing."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        if self.enabled and self.tty and self._state is not None:
            self._write("\n")
