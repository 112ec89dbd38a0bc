"""Profiling: measure S(gene, qtype) with live progress, a filling sensitivity table, cancel and resume.

The worker runs the profile job in its two steps (:mod:`empas_tui.jobs.profile_plan`): the plan (the
genes, the qtypes each can take, the cells already stored) draws the table, then every measured cell
arrives as a progress message. The screen only records messages and redraws on a 4 Hz timer, so
hundreds of events per second cost one repaint. Finished genes are committed to the storage as they
complete: cancelling (or quitting) keeps them, and starting again measures only what is missing.
Other workers on the same storage (``empas profile`` processes, docs/workers.md) take genes too: their
cells arrive as "remote" events and fill the table as they are stored, marked as theirs.
"""

from __future__ import annotations

import logging
import math
import threading
import time

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Label, ProgressBar
from textual.worker import get_current_worker

from profiling.profile import skip_reason

from ..config import RunConfig
from ..format import fmt_seconds, one_line, took_text
from ..messages import ProfileFinished, ProfilePlanned, ProfileProgress, ProfileStatus, ProfileStopped
from ..redraw import REDRAW_SECONDS, ThrottledRedraw

log = logging.getLogger(__name__)


def heat_style(value: float, top: float) -> str:
    """Colour a sensitivity relative to the column's largest: the eye finds the fragile layers."""
    if not math.isfinite(value) or top <= 0:
        return ""
    r = value / top
    if r > 0.66:
        return "bold red"
    if r > 0.33:
        return "yellow"
    if r > 0.1:
        return "green"
    return "dim"


class ProfileScreen(ThrottledRedraw, Screen):
    TITLE_TEXT = "Profile"
    HELP = """\
Each layer (gene) is quantised alone at each type and the KL divergence of the model's next-token
distribution to the dense model is **measured** on the calibration tokens (or estimated, for the
`fisher` metric). Bigger = that layer hurts more at that type. `-` = the type does not fit the
layer's shape (it is never offered to it). `skip` = the fast profile skipped the cell: a
cheaper-or-equal type of the same layer is as good (never offered either). The unquantised type
(16 / f16) has S = 0. Other `empas profile` workers on the same storage share the layers: theirs
show a cyan ✓.

| key | action |
|---|---|
| `c` / `escape` | cancel (finished genes stay saved); `escape` again goes back |
| `r` | run again / resume after a cancel or an error (only missing genes are measured) |
| `o` | cycle the sort column (or click a column header) |
| `s` | start the search when the profile is complete |
"""
    BINDINGS = [
        Binding("c", "cancel", "Cancel"),
        Binding("escape", "back", "Back"),
        Binding("r", "restart", "Resume"),
        Binding("o", "sort", "Sort"),
        Binding("s", "search", "Search"),
    ]
    PALETTE = [
        ("Cancel profiling", "Stop after the current layer; finished layers stay cached", "cancel"),
        ("Resume profiling", "Measure the layers that are still missing", "restart"),
        ("Start search", "Search per-layer types on this profile", "search"),
    ]

    def __init__(self, cfg: RunConfig, autostart: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.autostart = autostart  # False: only show what is fed to it (benchmarks)
        self.state = "idle"  # idle | running | cancelling | done | cancelled | failed
        self.genes: list[str] = []
        self.params: list[int] = []
        self.qtypes: list[str] = list(cfg.profile.quantizer.qtypes)
        self.unquantized = cfg.profile.quantizer.unquantized
        self.valid: list[list[bool]] = []
        self.values: dict[tuple[int, str], float] = {}
        self.remote_genes: set[int] = set()  # genes with cells other workers stored during this run
        self.remote = 0  # those cells
        self.current = -1  # the gene this worker measures now ("claim" events), -1 while it waits
        self.claims_seen = False
        self.done = 0
        self.total = 0
        self.eta: float | None = None
        self.eta_at = 0.0  # when ``eta`` was measured: it counts down from there
        self.started = 0.0
        self.status = ""
        self.job = None  # the finished jobs.profile.ProfileJob
        self.sort_index = 0  # 0 = layer order, 1 = name, 2 = params, 3.. = S columns
        self.sort_reverse = False
        self._dirty = True
        self._rows_dirty = True
        self._shown: dict[int, tuple] = {}  # what each table row shows (to update only changed cells)
        self._shown_order: list[int] = []
        self._shown_tops: dict[str, float] = {}
        self._shown_current = -1
        self._changed: set[int] = set()  # genes with new values since the last redraw
        self._next_redraw = 0.0
        self._stop = threading.Event()

    @property
    def profile(self):
        return self.job.profile if self.job is not None else None

    def compose(self) -> ComposeResult:
        yield Header()
        yield Label(self.cfg.profile.summary(), id="profile-title", classes="dim")
        with Horizontal(classes="bar-row"):
            yield Label("cells", classes="bar-label")
            yield ProgressBar(id="overall", show_eta=False)
            yield Label("", id="eta", classes="bar-info")
        with Horizontal(classes="bar-row"):
            yield Label("layers", classes="bar-label")
            yield ProgressBar(id="genes-bar", show_eta=False)
            yield Label("", id="gene-now", classes="bar-info")
        yield Label("", id="profile-status")
        yield DataTable(id="sensitivity", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "profile"
        self.set_interval(REDRAW_SECONDS, self._tick)
        self.set_interval(1.0, self._tick_clock)  # the elapsed time and the ETA move between cells too
        if self.autostart:
            self.start()

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action == "cancel":
            return self.state in ("running", "cancelling")
        if action == "restart":
            return self.state in ("cancelled", "failed")
        if action == "search":
            return self.state == "done"
        return True

    def start(self) -> None:
        self._stop.clear()
        self.state = "running"
        self.started = time.monotonic()
        self.status = "starting..."
        self.job = None
        self.current = -1
        self._dirty = True
        self.refresh_bindings()
        self._work(self.cfg)

    @work(thread=True, exclusive=True, group="profile", exit_on_error=False)
    def _work(self, cfg: RunConfig) -> None:
        """Job-layer calls only; every result goes back as a message."""
        from profiling.sensitivity import ProfileCancelled

        from ...jobs.profile_plan import measure_plan, plan_profile

        worker = get_current_worker()

        def should_stop() -> bool:
            return self._stop.is_set() or worker.is_cancelled

        post = self.post_message
        try:
            post(ProfileStatus(f"loading model {cfg.profile.model}..."))
            loaded = self.app.load_model(cfg.profile.model, placement=cfg.profile)
            if should_stop():
                raise ProfileCancelled("cancelled")
            post(ProfileStatus("tokenising the calibration text..."))
            plan = plan_profile(cfg.profile, self.app.db, loaded)
            post(ProfilePlanned(plan))
            post(ProfileStatus("dense reference pass..." if len(plan.known) < plan.total
                               else "every entry is stored: loading..."))
            job = measure_plan(plan, self.app.db, progress=lambda e: post(ProfileProgress(e)),
                               should_stop=should_stop)
            post(ProfileFinished(job))
        except ProfileCancelled:
            post(ProfileStopped("cancelled: finished layers are saved; press r to resume", error=False))
        except Exception as exc:  # any failure becomes one line on screen, the traceback goes to the log
            log.exception("profiling failed")
            post(ProfileStopped(one_line(exc), error=True))

    # -- message handlers: record, mark dirty; the timer redraws --------------------------------------

    def on_profile_status(self, message: ProfileStatus) -> None:
        self.status = message.text
        self._dirty = True

    def on_profile_planned(self, message: ProfilePlanned) -> None:
        plan = message.plan
        self.genes, self.params, self.qtypes = plan.gene_names, plan.gene_params, plan.qtypes
        self.unquantized = plan.unquantized
        self.valid = [list(map(bool, row)) for row in plan.valid]
        self.values = {c: (math.nan if skip_reason(v) else v) for c, v in plan.known.items()}
        self.total = plan.total
        self.done = len(plan.known)
        if plan.note:
            self.notify(plan.note, title="Profile", timeout=8)
        self._setup_columns()
        self._dirty = self._rows_dirty = True

    def on_profile_progress(self, message: ProfileProgress) -> None:
        e = message.event
        self.done, self.total = e.done, e.total
        self.eta, self.eta_at = e.eta_seconds, time.monotonic()
        if e.kind == "entry":
            self.values[(e.gene_index, e.qtype)] = e.value
            self._changed.add(e.gene_index)
            self._rows_dirty = True
            self.status = f"measured {e.gene} at {e.qtype}" if e.qtype != self.unquantized else f"{e.gene} done"
        elif e.kind == "remote":
            self.values[(e.gene_index, e.qtype)] = e.value
            self.remote += 1
            self.remote_genes.add(e.gene_index)
            self._changed.add(e.gene_index)
            self._rows_dirty = True
            self.status = f"{self.remote} cells from other workers (last: {e.gene} at {e.qtype})"
        elif e.kind == "claim":
            self._changed |= {self.current, e.gene_index} - {-1}
            self.current, self.claims_seen = e.gene_index, True
            self._rows_dirty = True
            if self.status.startswith("waiting"):
                self.status = f"measuring {e.gene} (its worker stopped: taken over)"
        elif e.kind == "wait":
            self._changed |= {self.current} - {-1}
            self.current = -1
            self._rows_dirty = True
            self.status = f"waiting for {e.held} layers other workers are measuring"
        elif e.kind == "start":
            self.status = "measuring..."
        self._dirty = True

    def on_profile_finished(self, message: ProfileFinished) -> None:
        self.job = message.job
        p = self.job.profile
        for i in range(p.n_genes):
            for j, q in enumerate(p.qtypes):
                if p.valid[i, j]:
                    self.values[(i, q)] = float(p.sensitivity[i, j])  # nan: skipped as dominated
        self._changed = set(range(p.n_genes))
        self.done = self.total = int(p.valid.sum())
        self.state = "done"
        dense = " (dense = the dequantised Q4_1 GGUF)" if p.model_id == "default" else ""
        skipped = f" {p.skipped_text()}." if p.skipped_text() else ""
        self.status = (f"[b green]done[/]: {took_text(p)}. Dense loss {p.base_loss:.4f} (PPL {p.base_ppl:.2f}) "
                       f"measured{dense}.{skipped} Press [b]s[/] to search.")
        self._dirty = self._rows_dirty = True
        self.refresh_bindings()
        self._redraw()

    def on_profile_stopped(self, message: ProfileStopped) -> None:
        self.state = "failed" if message.error else "cancelled"
        self.status = f"[b red]error:[/] {message.text}" if message.error else message.text
        if message.error:
            self.notify(message.text, title="Profiling failed", severity="error", timeout=10)
        self._dirty = self._rows_dirty = True
        self.refresh_bindings()
        self._redraw()

    # -- drawing ------------------------------------------------------------------------------------

    def sens_qtypes(self) -> list[str]:
        """The table's S columns: every offered qtype but the unquantised one (S = 0 there)."""
        return [q for q in self.qtypes if q != self.unquantized]

    def _fits(self, i: int, q: str) -> bool:
        return not self.valid or self.valid[i][self.qtypes.index(q)]

    def _setup_columns(self) -> None:
        table = self.query_one("#sensitivity", DataTable)
        table.clear(columns=True)
        self._shown, self._shown_order = {}, []
        table.add_column("#", key="idx")
        table.add_column("layer", key="gene")
        table.add_column("params", key="params")
        table.add_column("done", key="state")
        for q in self.sens_qtypes():
            table.add_column(f"S@{q}", key=f"S{q}")

    def _gene_total(self, i: int) -> int:
        return sum(self.valid[i]) if self.valid else len(self.qtypes)

    def _gene_done(self, i: int) -> int:
        return sum((i, q) in self.values for q in self.qtypes)

    def _current_gene(self) -> int:
        if self.state != "running":
            return -1
        if self.claims_seen:  # the job says which gene it measures (other workers may hold earlier ones)
            return self.current
        for i in range(len(self.genes)):
            if self._gene_done(i) < self._gene_total(i):
                return i
        return -1

    def _sort_key(self):
        k = self.sort_index
        if k == 0:
            return lambda i: i
        if k == 1:
            return lambda i: self.genes[i]
        if k == 2:
            return lambda i: self.params[i]
        q = self.sens_qtypes()[k - 3]
        return lambda i: self.values.get((i, q), -math.inf)

    def sort_label(self) -> str:
        names = ["layer order", "name", "params"] + [f"S@{q}" for q in self.sens_qtypes()]
        return names[self.sort_index % len(names)]

    def _redraw(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        overall = self.query_one("#overall", ProgressBar)
        overall.update(total=max(self.total, 1), progress=self.done if self.total else 0)
        n = len(self.genes)
        finished = sum(self._gene_done(i) == self._gene_total(i) for i in range(n)) if n else 0
        self.query_one("#genes-bar", ProgressBar).update(total=max(n, 1), progress=finished)
        self._draw_clock()
        cur = self._current_gene()
        self.query_one("#gene-now", Label).update(f"{finished}/{n}" + (f" now {self.genes[cur]}" if cur >= 0 else ""))
        if self._rows_dirty:
            self._rows_dirty = False
            self._fill_rows(cur)

    def _tick_clock(self) -> None:
        if self.state == "running":
            self._draw_clock()

    def eta_left(self) -> float | None:
        """The job's last ETA, less the time since it came (None: not known yet)."""
        if self.eta is None:
            return None
        return max(self.eta - (time.monotonic() - self.eta_at), 0.0)

    def _draw_clock(self) -> None:
        """The count, the ETA and the elapsed time (cheap: two labels, redrawn every second)."""
        eta = "" if self.state != "running" else f" ETA {fmt_seconds(self.eta_left())}"
        self.query_one("#eta", Label).update(f"{self.done}/{self.total}{eta}")
        elapsed = time.monotonic() - self.started if self.state == "running" else None
        others = f"; {self.remote} cells from other workers" if self.remote and self.state == "running" else ""
        extra = f"  [dim]({fmt_seconds(elapsed)}{others}; sort {self.sort_label()})[/]" if elapsed else (
            f"  [dim](sort {self.sort_label()})[/]" if self.genes else "")
        self.query_one("#profile-status", Label).update(self.status + extra)

    def _row_cells(self, i: int, current: int, tops: dict[str, float]) -> list:
        done, total = self._gene_done(i), self._gene_total(i)
        if done == total:
            state = Text("✓", style="cyan" if i in self.remote_genes else "green")
        elif i == current:
            state = Text("▶", style="bold yellow")
        else:
            state = Text(f"{done}/{total}" if done else "·", style="dim")
        cells = [str(i), self.genes[i], f"{self.params[i]:,}", state]
        for q in self.sens_qtypes():
            v = self.values.get((i, q))
            if not self._fits(i, q):
                cells.append(Text("-", style="dim", justify="right"))
            elif v is not None and not math.isfinite(v):  # skipped: a cheaper-or-equal type is as good
                cells.append(Text("skip", style="dim", justify="right"))
            else:
                cells.append(Text("" if v is None else f"{v:.5f}", style=heat_style(v, tops[q]) if v is not None
                                  else "", justify="right"))
        return cells

    @staticmethod
    def _signature(cells: list) -> tuple:
        return tuple((str(c), str(getattr(c, "style", ""))) for c in cells)

    def _fill_rows(self, current: int) -> None:
        """Update the cells that changed; rebuild only when the row order changes (a resort)."""
        table = self.query_one("#sensitivity", DataTable)
        sens = self.sens_qtypes()
        tops = {q: max([v for (i, qq), v in self.values.items() if qq == q and math.isfinite(v)] or [0.0])
                for q in sens}
        order = sorted(range(len(self.genes)), key=self._sort_key(), reverse=self.sort_reverse)
        same_layout = order == self._shown_order and table.row_count == len(order)
        if same_layout and tops == self._shown_tops:
            # only the genes that got values, and the old and new "measuring" marks, can differ
            todo = self._changed | {current, self._shown_current} - {-1}
        else:
            todo = set(order)
        self._changed = set()
        self._shown_tops, self._shown_current = tops, current
        cells = {i: self._row_cells(i, current, tops) for i in todo}
        if same_layout:
            keys = ["idx", "gene", "params", "state"] + [f"S{q}" for q in sens]
            for i in todo:
                sig = self._signature(cells[i])
                old = self._shown.get(i)
                if old == sig:
                    continue
                for key, cell, a, b in zip(keys, cells[i], old or (), sig):
                    if a != b:
                        table.update_cell(str(i), key, cell, update_width=True)
                self._shown[i] = sig
            return
        keep = table.cursor_row
        table.clear()
        for i in order:
            table.add_row(*cells[i], key=str(i))
        self._shown = {i: self._signature(cells[i]) for i in order}
        self._shown_order = order
        if table.row_count:
            table.move_cursor(row=min(keep, table.row_count - 1), animate=False)

    # -- actions ------------------------------------------------------------------------------------

    def action_cancel(self) -> None:
        if self.state == "running":
            self.state = "cancelling"
            self._stop.set()
            self.status = "cancelling after the current layer..."
            self._dirty = True
            self.refresh_bindings()

    def action_back(self) -> None:
        if self.state == "running":
            self.action_cancel()
            self.notify("Cancelling; press escape again to go back.", timeout=3)
            return
        self.app.pop_screen()  # a worker still finishing its layer stops on its own (unmount sets the flag)

    def action_restart(self) -> None:
        if self.state in ("cancelled", "failed"):
            self.start()

    def action_sort(self) -> None:
        self.sort_index = (self.sort_index + 1) % (3 + len(self.sens_qtypes()))
        self.sort_reverse = self.sort_index >= 2  # big first for numbers
        self._dirty = self._rows_dirty = True
        self._redraw()

    @on(DataTable.HeaderSelected)
    def _header(self, event: DataTable.HeaderSelected) -> None:
        key = str(event.column_key.value)
        index = {"idx": 0, "gene": 1, "params": 2, "state": 0}.get(key)
        if index is None:
            index = 3 + self.sens_qtypes().index(key[1:])
        if index == self.sort_index:
            self.sort_reverse = not self.sort_reverse
        else:
            self.sort_index, self.sort_reverse = index, index >= 2
        self._dirty = self._rows_dirty = True
        self._redraw()

    def action_search(self) -> None:
        if self.state != "done" or self.job is None:
            self.notify("The profile is not complete yet.", severity="warning")
            return
        self.app.open_search(self.cfg.study, self.cfg, self.job)

    def on_unmount(self) -> None:
        self._stop.set()
