"""The first screen: the studies and cached profiles in the storage; resume, start or delete."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Label

from .state import RunConfig, one_line

log = logging.getLogger(__name__)


def _ago(ts) -> str:
    """'5m ago' from a UNIX time or an ISO timestamp (local time), '-' if unknown."""
    if not ts:
        return "-"
    if isinstance(ts, str):
        try:
            from datetime import datetime

            ts = datetime.fromisoformat(ts).timestamp()
        except ValueError:
            return ts
    s = max(0.0, time.time() - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.0f}{unit} ago"
    return f"{s:.0f}s ago"


def list_studies_rows(url: str) -> list[dict]:
    """The engine's study listing (model, granularity, trials, front size, last update)."""
    from search.study import list_studies

    return list_studies(url)


def list_profile_rows(url: str) -> list[dict]:
    from storage.profiles import ProfileStore

    store = ProfileStore(url)
    try:
        return store.list_profiles()
    finally:
        store.close()


class StudiesScreen(Screen):
    TITLE_TEXT = "Studies"
    HELP = """\
The studies and cached sensitivity profiles in the storage shown at the top.

| key | action |
|---|---|
| `n` | new study: choose model, bit-widths, calibration; then profile and search |
| `enter` | on a study: open it (resume its search, pick archetypes); on a profile: new study from it (reuses the measurements) |
| `d` | delete the highlighted study (asks first) |
| `r` | refresh the lists |
| `tab` | switch between the two tables |
"""
    BINDINGS = [
        Binding("n", "new", "New study"),
        Binding("enter", "open", "Open", show=True),
        Binding("d", "delete", "Delete"),
        Binding("r", "refresh", "Refresh", show=False),
    ]
    PALETTE = [
        ("Resume study", "Open the highlighted study and continue its search", "open"),
        ("Delete study", "Delete the highlighted study (asks for confirmation)", "delete"),
        ("Refresh studies", "Reload the studies and profiles from the storage", "refresh"),
    ]

    class Loaded(Message):
        def __init__(self, studies: list[dict] | None, profiles: list[dict], error: str = "") -> None:
            super().__init__()
            self.studies, self.profiles, self.error = studies, profiles, error

    def __init__(self) -> None:
        super().__init__()
        self.studies: list[dict] = []
        self.profiles: list[dict] = []

    def compose(self) -> ComposeResult:
        from storage.urls import redact

        yield Header()
        yield Label(f"storage {redact(self.app.storage_url)}", id="storage-line", classes="dim")
        yield Label("Studies", classes="section")
        yield DataTable(id="studies", cursor_type="row", zebra_stripes=True)
        yield Label("Cached sensitivity profiles (enter: new study reusing it)", classes="section")
        yield DataTable(id="profiles", cursor_type="row", zebra_stripes=True)
        yield Label("", id="studies-hint", classes="hint")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "studies"
        studies = self.query_one("#studies", DataTable)
        studies.add_columns("study", "model", "genes", "trials", "front", "updated")
        profiles = self.query_one("#profiles", DataTable)
        profiles.add_columns("model", "genes", "metric", "entries", "calib tokens", "corpus")

    def on_screen_resume(self) -> None:
        """Also sent when the screen is first shown: one listing, not two racing each other."""
        self.refresh_lists()

    def refresh_lists(self) -> None:
        self.query_one("#studies-hint", Label).update("loading...")
        self._load(self.app.storage_url)

    @work(thread=True, exclusive=True, group="studies-list", exit_on_error=False)
    def _load(self, url: str) -> None:
        error, studies = "", None
        try:
            profiles = list_profile_rows(url)
        except Exception as exc:  # storage down: say so on the screen, not in a traceback
            log.exception("listing profiles failed")
            self.post_message(self.Loaded([], [], one_line(exc)))
            return
        try:
            studies = list_studies_rows(url)
        except ImportError:
            studies = None
        except Exception as exc:
            log.exception("listing studies failed")
            error = one_line(exc)
        self.post_message(self.Loaded(studies, profiles, error))

    def on_studies_screen_loaded(self, message: Loaded) -> None:
        self.studies = message.studies or []
        self.profiles = list(message.profiles)
        table = self.query_one("#studies", DataTable)
        table.clear()
        for s in self.studies:
            other = sum((s.get("trials_other") or {}).values())
            trials = f"{s.get('trials_complete', 0):,}" + (f" (+{other})" if other else "")
            table.add_row(s.get("name", "?"), str(s.get("model") or "-")[-28:],
                          f"{s.get('n_genes') or '-'} {s.get('granularity') or ''}".strip(), trials,
                          str(s.get("front_size", "-")), _ago(s.get("last_update")), key=s.get("name"))
        ptable = self.query_one("#profiles", DataTable)
        ptable.clear()
        for p in self.profiles:
            genes = len(p.get("gene_names", []))
            ptable.add_row(str(p.get("model_id", "?"))[-28:], f"{genes} {p.get('granularity', '')}",
                           p.get("metric", "-"), str(p.get("entries", 0)), str(p.get("calibration_tokens", "-")),
                           Path(str(p.get("corpus_source", "default"))).name, key=p.get("key"))
        hint = self.query_one("#studies-hint", Label)
        if message.error:
            hint.update(f"[b red]storage error:[/] {message.error}")
        elif not self.studies and not self.profiles:
            hint.update("Nothing here yet: press [b]n[/] to set up a model and start profiling.")
        else:
            hint.update("[b]n[/] new  [b]enter[/] open  [b]d[/] delete  [b]tab[/] switch table  [b]?[/] help")
        if self.studies:
            table.focus()
        elif self.profiles:
            ptable.focus()

    # -- actions --------------------------------------------------------------------------------------

    def _focused_table(self) -> DataTable | None:
        focused = self.focused
        return focused if isinstance(focused, DataTable) else None

    def action_new(self, cfg: RunConfig | None = None) -> None:
        from .setup import SetupScreen

        self.app.push_screen(SetupScreen(cfg))

    def action_refresh(self) -> None:
        self.refresh_lists()

    def action_open(self) -> None:
        table = self._focused_table()
        if table is None or table.row_count == 0:
            return
        row = table.cursor_row
        if table.id == "profiles":
            self.action_new(config_from_profile(self.profiles[row], self.app.default_model))
        else:
            self.open_study(self.studies[row]["name"])

    @on(DataTable.RowSelected)
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_open()

    def open_study(self, name: str) -> None:
        from .search import SearchScreen

        self.app.push_screen(SearchScreen.for_study(name))

    def action_delete(self) -> None:
        table = self.query_one("#studies", DataTable)
        if self.focused is not table or not self.studies:
            self.notify("Highlight a study in the Studies table to delete it.", severity="warning")
            return
        name = self.studies[table.cursor_row]["name"]

        def answer(yes: bool | None) -> None:
            if yes:
                self._delete(self.app.storage_url, name)

        from .dialogs import ConfirmScreen

        self.app.push_screen(ConfirmScreen(f"Delete study [b]{name}[/] and all its trials?\n"
                                           "Cached profiles are kept."), answer)

    @work(thread=True, group="studies-delete", exit_on_error=False)
    def _delete(self, url: str, name: str) -> None:
        from search.study import delete_study

        try:
            delete_study(url, name)
        except Exception as exc:
            log.exception("delete failed")
            self.app.call_from_thread(self.notify, f"could not delete {name}: {one_line(exc)}", severity="error")
            return
        self.app.call_from_thread(self.notify, f"deleted study {name}")
        self.app.call_from_thread(self.refresh_lists)


def config_from_profile(header: dict, model_override: str | None = None) -> RunConfig:
    """A setup prefilled so that profiling hits the cached entries (same model, corpus, quantiser)."""
    cfg = RunConfig()
    source = header.get("corpus_source", "default")
    return cfg.with_(
        model=header.get("model_id") or model_override or "default",
        granularity=header.get("granularity", cfg.granularity),
        metric=header.get("metric", cfg.metric),
        group_size=int(header.get("quantizer", {}).get("group_size", cfg.group_size)),
        calib_tokens=int(header.get("calibration_tokens", cfg.calib_tokens)),
        text_file="" if source == "default" else source,
    )
