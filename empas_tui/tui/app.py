"""The EMPAS terminal UI: ``empas`` with no arguments (or ``empas tui``) opens it.

The app is a thin client of the job layer (:mod:`empas_tui.jobs`) and the study catalogue
(:mod:`search.catalogue`): screens turn the user's input into the engine's settings objects
(:mod:`empas_tui.tui.config`), call the jobs in ``@work(thread=True)`` workers that only post messages
(:mod:`empas_tui.tui.messages`), and redraw on a timer so a fast stream of progress events never
floods the terminal (important over SSH).

Screens never import each other: they move through the app's ``open_*`` methods, which are the one
place that knows the screens. The app also holds what every screen shares: the storage, opened once
(:func:`storage.database.open_database`), the loaded model, and the optuna-dashboard handle.

Nothing from Optuna, transformers or warnings may be written to the terminal while the UI owns it:
logging goes to a file under the cache folder and to the in-app log panel (``l``), see :mod:`.logs`.
"""

from __future__ import annotations

import argparse
import logging
import threading
from pathlib import Path
from typing import Callable, Iterable

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from .logs import RingHandler, log_file_path, route_library_logging
from .messages import LogLine

log = logging.getLogger("empas_tui")

ModelLoader = Callable[[str | None], object]


class EmpasApp(App):
    """Studies -> setup -> profile -> search -> archetypes, plus the optuna-dashboard screen."""

    TITLE = "EMPAS"
    SUB_TITLE = "mixed-precision search"
    CSS_PATH = "empas.tcss"
    BINDINGS = [
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("l", "show_log", "Log", show=False),
        Binding("w", "dashboard", "Dashboard", show=False),
        Binding("ctrl+q", "quit", "Quit", priority=True, show=False),
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
        self._db = None
        self._db_lock = threading.Lock()
        self.ring = ring or RingHandler()
        self.log_path = log_path
        self.dashboard = None  # the running optuna-dashboard handle, shared by every screen

    # -- what the screens share (called from worker threads) --------------------------------------------

    @property
    def db(self):
        """The storage (:class:`storage.database.Database`), opened once on first use."""
        with self._db_lock:
            if self._db is None:
                from storage.database import open_database

                self._db = open_database(self.storage_url)
            return self._db

    def load_model(self, spec: str | None, fingerprint: str | None = None, placement=None):
        """Load (once per spec and placement) and return a LoadedModel; with ``fingerprint``, refuse other
        weights. ``placement``: the setup's ProfileSettings (device, dtype, memory cap); None: float32 on
        the CPU. Called from worker threads only."""
        from profiling.models import resolve_model_spec

        key = resolve_model_spec(spec) if self._loader is None else (spec or "default")
        if placement is not None:
            key = (key, placement.device, placement.dtype, placement.max_memory_mib, placement.stream)
        with self._model_lock:
            if key not in self._models:
                if self._loader is not None:
                    loaded = self._loader(spec)
                elif placement is not None:
                    from profiling.sensitivity import load_for

                    loaded, _ = load_for(placement.with_(model=spec or "default"))
                else:
                    from profiling.models import load_model

                    loaded = load_model(spec)
                route_library_logging(self.ring)  # transformers configured its logger on first use
                self._models = {key: loaded}  # keep one model in memory, not one per spec tried
            loaded = self._models[key]
        if fingerprint is not None and loaded.fingerprint != fingerprint:
            raise ValueError(f"the model {loaded.model_id} has other weights than the study's (weights "
                             f"{fingerprint[:12]}): start the TUI with --model and that model")
        return loaded

    def cached_model(self, fingerprint: str):
        """The model already loaded with these weights, or None (never loads: for extras a screen can
        do without, such as the presets on the plot of a study opened from the list)."""
        with self._model_lock:
            return next((m for m in self._models.values() if m.fingerprint == fingerprint), None)

    # -- navigation: the one place that knows the screens ------------------------------------------------

    def open_studies(self) -> None:
        from .screens.studies import StudiesScreen

        while len(self.screen_stack) > 2 and not isinstance(self.screen, StudiesScreen):
            self.pop_screen()
        if isinstance(self.screen, StudiesScreen):
            self.screen.refresh_lists()

    def open_setup(self, cfg=None) -> None:
        """The setup form, prefilled with ``cfg`` (a :class:`.config.RunConfig`) or the defaults."""
        from .screens.setup import SetupScreen

        self.push_screen(SetupScreen(cfg))

    def open_profile(self, cfg) -> None:
        from .screens.profile import ProfileScreen

        self.push_screen(ProfileScreen(cfg))

    def open_search(self, study: str, cfg=None, profile_job=None) -> None:
        """A stored study (``cfg`` None), or a new one started from ``cfg`` on a finished profile job."""
        from .screens.search import SearchScreen

        self.push_screen(SearchScreen(study, cfg, profile_job))

    def open_point(self, study: str, point, profile) -> None:
        from .screens.point import PointScreen

        self.push_screen(PointScreen(study, point, profile))

    def open_archetypes(self, study: str, model: str | None = None) -> None:
        from .screens.archetypes import ArchetypesScreen

        self.push_screen(ArchetypesScreen(study, model))

    def action_help(self) -> None:
        from .dialogs import HelpScreen

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
        self.open_setup()

    def action_studies(self) -> None:
        self.open_studies()

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

        for name in ("empas_tui.jobs.search", "empas_tui.jobs.export", "profiling.models"):
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
        for screen in self.screen_stack:
            if hasattr(screen, "append_log"):
                screen.append_log(message.line)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """Command palette (ctrl+p): the current screen's own actions first, then app-wide ones."""
        for title, help_text, action in getattr(screen, "PALETTE", ()):
            if screen.check_action(action, ()) is not False:
                yield SystemCommand(title, help_text, lambda a=action, s=screen: s.run_action(a))
        yield SystemCommand("New study", "Set up a model, quantiser and calibration, then profile",
                            self.action_new_study)
        yield SystemCommand("Studies", "Back to the list of studies and cached profiles", self.action_studies)
        yield SystemCommand("Dashboard", "Start/stop optuna-dashboard for this storage (w)", self.action_dashboard)
        yield SystemCommand("Log", "Show the log: Optuna, transformers, EMPAS messages (l)", self.action_show_log)
        yield SystemCommand("Help", "Keys and what this screen does (?)", self.action_help)
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

    from empas_tui.cli import signals
    from storage.database import check_storage
    from storage.urls import StorageError, resolve_storage_url

    args = build_parser().parse_args(argv or [])
    url = resolve_storage_url(args.storage)
    try:
        check_storage(url)  # reachable, and a SQLite file not damaged
    except StorageError as exc:
        print(f"empas: error: {exc}", file=sys.stderr)
        return 2
    ring = RingHandler()
    path = route_library_logging(ring, log_file_path())
    app = EmpasApp(storage=url, model=args.model, ring=ring, log_path=path)
    with signals.app_exits_on_signals(app):  # SIGTERM/SIGHUP/SIGINT: exit as on Ctrl-Q, code 128+N
        app.run()
        if signals.received() is not None:
            signals.say(f"empas: {signals.describe()}; finished work is saved, run `empas` again to resume")
    return int(app.return_code or 0)
