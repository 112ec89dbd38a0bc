"""Where log records go while the TUI owns the terminal: a file and the in-app log panel, never stderr.

Optuna, transformers and warnings would otherwise write over the screen.
"""

from __future__ import annotations

import logging
from collections import deque
from pathlib import Path

from .messages import LogLine

LOG_LINES = 2000


class RingHandler(logging.Handler):
    """Keeps the last log lines for the log panel and forwards new ones to the running app."""

    def __init__(self, capacity: int = LOG_LINES) -> None:
        super().__init__(level=logging.INFO)
        self.lines: deque[str] = deque(maxlen=capacity)
        self.app = None  # the running textual App, set on mount
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # a broken record must never take the UI down
            return
        self.lines.append(line)
        app = self.app
        if app is not None and app.is_running:
            app.post_message(LogLine(line))


def log_file_path() -> Path:
    """``<cache>/logs/tui.log``; the cache folder rule of ``profiling.models.cache_dir``, without
    importing it (that module imports torch, which would add seconds to the UI's start)."""
    import os

    env = os.environ.get("EMPAS_CACHE_DIR")
    if env:
        base = Path(env)
    else:
        from platformdirs import user_cache_dir

        base = Path(user_cache_dir("empas"))
    return base / "logs" / "tui.log"


def route_library_logging(ring: RingHandler | None = None, path: Path | None = None) -> Path | None:
    """Send every logger (Optuna, transformers, warnings, EMPAS) to a file and the ring, never to stderr.

    Optuna and transformers install their own stderr handlers; those are removed and the libraries are
    made to propagate to the root logger instead. Safe to call more than once (it is called again after
    a model load, because transformers configures its logger lazily on first use).
    """
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            root.removeHandler(h)
    written = None
    if path is not None and not any(isinstance(h, logging.FileHandler) for h in root.handlers):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fh = logging.FileHandler(path, encoding="utf-8")
            fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            root.addHandler(fh)
            written = path
        except OSError:
            written = None
    if ring is not None and ring not in root.handlers:
        root.addHandler(ring)
    logging.captureWarnings(True)
    for name in ("profiling", "search", "storage", "empas_tui"):
        lg = logging.getLogger(name)
        lg.handlers = [h for h in lg.handlers if not isinstance(h, logging.StreamHandler)
                       or isinstance(h, logging.FileHandler)]
        lg.propagate = True
    try:
        import optuna

        optuna.logging.disable_default_handler()
        optuna.logging.enable_propagation()
    except ImportError:  # pragma: no cover
        pass
    import sys

    if "transformers" in sys.modules:
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_default_handler()
            hf_logging.enable_propagation()
            hf_logging.disable_progress_bar()
        except Exception:  # pragma: no cover - older/newer transformers
            pass
    return written
