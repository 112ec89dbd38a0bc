"""The EMPAS terminal UI: ``empas`` with no arguments (or ``empas tui``) opens it.

The app is a thin client of the engine: every screen calls ``profiling``/``search``/``storage``
functions, long jobs run in ``@work(thread=True)`` workers that only post messages, and screens redraw
on a timer so a fast stream of progress events never floods the terminal (important over SSH).

Nothing from Optuna, transformers or warnings may be written to the terminal while the UI owns it: all
logging goes to a file under the cache folder and to the in-app log panel (``l``).
"""

from __future__ import annotations

import argparse
import logging
import threading
from collections import deque
from pathlib import Path
from typing import Callable, Iterable

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen

log = logging.getLogger("empas_tui")

LOG_LINES = 2000


class LogLine(Message):
    """A formatted log record, posted to the app from any thread."""

    def __init__(self, line: str) -> None:
        super().__init__()
        self.line = line


class RingHandler(logging.Handler):
    """Keeps the last log lines for the log panel and forwards new ones to the running app."""

    def __init__(self, capacity: int = LOG_LINES) -> None:
        super().__init__(level=logging.INFO)
        self.lines: deque[str] = deque(maxlen=capacity)
        self.app: App | None = None
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


ModelLoader = Callable[[str | None], object]


class EmpasApp(App):
    """Studies -> setup -> profile -> search -> archetypes, plus the optuna-dashboard screen."""

    TITLE = "EMPAS"
    SUB_TITLE = "mixed-precision search"
    CSS_PATH = "empas.tcss"
    BINDINGS = [
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("l", "show_log", "Log", show=False),
        Binding("w", "dashboard", "Dashboard"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, storage: str | None = None, model: str | None = None,
                 loader: ModelLoader | None = None, ring: RingHandler | None = None,
                 log_path: Path | None = None) -> None:
        super().__init__()
        from storage.urls import resolve_storage_url

        self.storage_url = resolve_storage_url(storage)
        self.default_model = model
        self._loader = loader
        self._models: dict[str, object] = {}
        self._model_lock = threading.Lock()
        self.ring = ring or RingHandler()
        self.log_path = log_path
        self.dashboard = None  # the running optuna-dashboard handle, shared by every screen

    # -- engine access shared by the screens ---------------------------------------------------------

    def load_model(self, spec: str | None):
        """Load (once per spec) and return a LoadedModel; called from worker threads only."""
        from profiling.models import load_model, resolve_model_spec

        key = resolve_model_spec(spec) if self._loader is None else (spec or "default")
        with self._model_lock:
            if key not in self._models:
                loaded = (self._loader or load_model)(spec)
                route_library_logging(self.ring)  # transformers configured its logger on first use
                self._models = {key: loaded}  # keep one model in memory, not one per spec tried
            return self._models[key]

    # -- lifecycle ----------------------------------------------------------------------------------

    def on_mount(self) -> None:
        from .screens.studies import StudiesScreen

        self.ring.app = self
        route_library_logging(self.ring)
        self.push_screen(StudiesScreen())
        self._warm_up()

    @work(thread=True, exit_on_error=False, group="warm-up")
    def _warm_up(self) -> None:
        """Import the engine (torch, transformers) in the background while the user reads the list."""
        import importlib

        for name in ("profiling.sensitivity", "profiling.models", "search.study"):
            try:
                importlib.import_module(name)
            except ImportError:
                pass

    def on_unmount(self) -> None:
        self.ring.app = None
        self.stop_dashboard()

    def stop_dashboard(self) -> None:
        handle, self.dashboard = self.dashboard, None
        if handle is not None:
            handle.shutdown()

    def on_log_line(self, message: LogLine) -> None:
        from .screens.logview import LogScreen

        for screen in self.screen_stack:
            if isinstance(screen, LogScreen):
                screen.append(message.line)

    # -- actions available everywhere --------------------------------------------------------------

    def action_help(self) -> None:
        from .screens.dialogs import HelpScreen

        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.screen))

    def action_show_log(self) -> None:
        from .screens.logview import LogScreen

        if not isinstance(self.screen, LogScreen):
            self.push_screen(LogScreen(list(self.ring.lines), self.log_path))

    def action_dashboard(self) -> None:
        from .screens.dashboard import DashboardScreen

        if not isinstance(self.screen, DashboardScreen):
            self.push_screen(DashboardScreen())

    def action_new_study(self) -> None:
        from .screens.setup import SetupScreen

        self.push_screen(SetupScreen())

    def action_studies(self) -> None:
        from .screens.studies import StudiesScreen

        while len(self.screen_stack) > 2 and not isinstance(self.screen, StudiesScreen):
            self.pop_screen()
        if isinstance(self.screen, StudiesScreen):
            self.screen.refresh_lists()

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """Command palette (ctrl+p): the current screen's own actions first, then app-wide ones."""
        for title, help_text, action in getattr(screen, "PALETTE", ()):
            if screen.check_action(action, ()) is not False:
                yield SystemCommand(title, help_text, lambda a=action, s=screen: s.run_action(a))
        yield SystemCommand("New study", "Set up a model, bit-widths and calibration, then profile",
                            self.action_new_study)
        yield SystemCommand("Studies", "Back to the list of studies and cached profiles", self.action_studies)
        yield SystemCommand("Dashboard", "Start/stop optuna-dashboard for this storage", self.action_dashboard)
        yield SystemCommand("Log", "Show the log (Optuna, transformers, EMPAS messages)", self.action_show_log)
        yield SystemCommand("Help", "Keys and what this screen does", self.action_help)
        yield from super().get_system_commands(screen)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="empas tui", description="Open the EMPAS terminal UI.")
    p.add_argument("--storage", default=None,
                   help="SQLite file or SQLAlchemy URL for profiles and studies (default: $EMPAS_STORAGE or ./empas.db)")
    p.add_argument("--model", default=None,
                   help="model preselected in the setup screen (HF id, folder, .gguf; default: embedded SmolLM2)")
    return p


def run_app(argv: list[str] | None = None) -> int:
    """Entry point used by ``empas`` / ``empas tui``: check the storage, route logging, run the app."""
    import sys

    from storage.urls import StorageError, check_reachable, resolve_storage_url

    args = build_parser().parse_args(argv or [])
    url = resolve_storage_url(args.storage)
    try:
        check_reachable(url)
    except StorageError as exc:
        print(f"empas: error: {exc}", file=sys.stderr)
        return 2
    ring = RingHandler()
    path = route_library_logging(ring, log_file_path())
    app = EmpasApp(storage=url, model=args.model, ring=ring, log_path=path)
    app.run()
    return int(app.return_code or 0)
