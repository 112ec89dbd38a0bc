"""The first screen: the studies and cached profiles in the storage; resume, start or delete."""

from __future__ import annotations

import logging
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Label

from ..config import config_from_profile_header
from ..dialogs import ConfirmScreen
from ..format import ago, one_line
from ..messages import StudiesListed, StudyDeleted

log = logging.getLogger(__name__)


class StudiesScreen(Screen):
    TITLE_TEXT = "Studies"
    HELP = """\
The studies and cached sensitivity profiles in the storage shown at the top. The *front* column is
the number of distinct Pareto-optimal points, the same count `empas studies`, the search and the
archetypes screens show.

| key | action |
|---|---|
| `n` | new study: choose model, quantiser and types, calibration; then profile and search |
| `enter` | on a study: open it (resume its search, pick archetypes); on a profile: new study from it (reuses the measurements) |
| `d` | delete the highlighted study (asks first) |
| `r` | refresh the lists |
| `w` | optuna-dashboard for this storage |
| `tab` | switch between the two tables |
"""
    BINDINGS = [
        Binding("n", "new", "New"),
        Binding("enter", "open", "Open", show=True),
        Binding("d", "delete", "Delete"),
        Binding("w", "app.dashboard", "Dashboard"),
        Binding("r", "refresh", "Refresh", show=False),
    ]
    PALETTE = [
        ("Resume study", "Open the highlighted study and continue its search", "open"),
        ("Delete study", "Delete the highlighted study (asks for confirmation)", "delete"),
        ("Refresh studies", "Reload the studies and profiles from the storage", "refresh"),
    ]

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
        yield Label("Cached profiles (enter: new study reusing one)", classes="section")
        yield DataTable(id="profiles", cursor_type="row", zebra_stripes=True)
        yield Label("", id="studies-hint", classes="hint")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "studies"
        self.query_one("#studies", DataTable).add_columns("study", "model", "genes", "trials", "front", "updated")
        self.query_one("#profiles", DataTable).add_columns("model", "genes", "quantiser", "metric", "entries",
                                                           "calib", "corpus")

    def on_screen_resume(self) -> None:
        """Also sent when the screen is first shown: one listing, not two racing each other."""
        self.refresh_lists()

    def refresh_lists(self) -> None:
        self.query_one("#studies-hint", Label).update("loading...")
        self._load()

    @work(thread=True, exclusive=True, group="studies-list", exit_on_error=False)
    def _load(self) -> None:
        from search.catalogue import list_studies

        try:
            db = self.app.db
            profiles = db.profiles.list_profiles()
            for header in profiles:  # the qtypes measured, so "new study from it" reuses every cell
                header["qtypes"] = sorted({q for _, q in db.profiles.entries(header["key"])})
            studies = list_studies(db)
        except Exception as exc:  # storage down: say so on the screen, not in a traceback
            log.exception("listing the storage failed")
            self.post_message(StudiesListed([], [], one_line(exc)))
            return
        self.post_message(StudiesListed(studies, profiles))

    def on_studies_listed(self, message: StudiesListed) -> None:
        self.studies = list(message.studies)
        self.profiles = list(message.profiles)
        table = self.query_one("#studies", DataTable)
        table.clear()
        for s in self.studies:
            other = sum((s.get("trials_other") or {}).values())
            trials = f"{s.get('trials_complete', 0):,}" + (f" (+{other})" if other else "")
            genes = f"{s.get('n_genes') or '-'} {s.get('granularity') or ''}".strip() if s.get("empas") else "not EMPAS"
            table.add_row(s.get("name", "?"), str(s.get("model") or "-")[-24:], genes, trials,
                          str(s.get("front_size", "-")), ago(s.get("last_update")), key=s.get("name"))
        ptable = self.query_one("#profiles", DataTable)
        ptable.clear()
        for p in self.profiles:
            ptable.add_row(str(p.get("model_id", "?"))[-24:], f"{len(p.get('gene_names', []))} {p.get('granularity', '')}",
                           (p.get("quantizer") or {}).get("name", "-"), p.get("metric", "-"), str(p.get("entries", 0)),
                           str(p.get("calibration_tokens", "-")), Path(str(p.get("corpus_source", "default"))).name,
                           key=p.get("key"))
        hint = self.query_one("#studies-hint", Label)
        if message.error:
            hint.update(f"[b red]storage error:[/] {message.error}")
        elif not self.studies and not self.profiles:
            hint.update("Nothing here yet: press [b]n[/] to set up a model and start profiling.")
        else:
            hint.update("[b]n[/] new  [b]enter[/] open  [b]d[/] delete  [b]tab[/] other table  [b]?[/] help")
        if self.studies:
            table.focus()
        elif self.profiles:
            ptable.focus()

    # -- actions --------------------------------------------------------------------------------------

    def action_new(self) -> None:
        self.app.open_setup()

    def action_refresh(self) -> None:
        self.refresh_lists()

    def action_open(self) -> None:
        table = self.focused if isinstance(self.focused, DataTable) else None
        if table is None or table.row_count == 0:
            return
        row = table.cursor_row
        if table.id == "profiles":
            self.app.open_setup(config_from_profile_header(self.profiles[row]))
        elif self.studies[row].get("empas"):
            self.app.open_search(self.studies[row]["name"])
        else:
            self.notify("Not an EMPAS study: nothing to open here.", severity="warning")

    @on(DataTable.RowSelected)
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_open()

    def action_delete(self) -> None:
        table = self.query_one("#studies", DataTable)
        if self.focused is not table or not self.studies:
            self.notify("Highlight a study in the Studies table to delete it.", severity="warning")
            return
        name = self.studies[table.cursor_row]["name"]

        def answer(yes: bool | None) -> None:
            if yes:
                self._delete(name)

        self.app.push_screen(ConfirmScreen(f"Delete study [b]{name}[/] and all its trials?\n"
                                           "Cached profiles are kept."), answer)

    @work(thread=True, group="studies-delete", exit_on_error=False)
    def _delete(self, name: str) -> None:
        from search.catalogue import delete_study

        try:
            delete_study(self.app.db, name)
        except Exception as exc:
            log.exception("delete failed")
            self.post_message(StudyDeleted(name, one_line(exc)))
            return
        self.post_message(StudyDeleted(name))

    def on_study_deleted(self, message: StudyDeleted) -> None:
        if message.error:
            self.notify(f"could not delete {message.name}: {message.error}", severity="error")
        else:
            self.notify(f"deleted study {message.name}")
        self.refresh_lists()
