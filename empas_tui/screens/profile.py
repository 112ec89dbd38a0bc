"""Profiling: measure S(gene, bits) with live progress, a filling sensitivity table, cancel and resume.

The worker thread calls ``profiling.sensitivity.prepare`` and ``run_profile`` and posts every progress
event as a message; the screen only records them and redraws on a 4 Hz timer, so hundreds of events per
second cost one repaint. Finished genes are committed to the storage by the engine as they complete:
cancelling (or quitting) keeps them, and starting again measures only what is missing.
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
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Label, ProgressBar
from textual.worker import get_current_worker

from .state import RunConfig, one_line
from .redraw import REDRAW_SECONDS, ThrottledRedraw

log = logging.getLogger(__name__)



def fmt_seconds(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


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
Each layer (gene) is quantised alone at each bit-width and the KL divergence of the model's next-token
distribution to the dense model is **measured** on the calibration tokens (or estimated, for the
`fisher` metric). Bigger = that layer hurts more at that width. 16 bits means untouched (S = 0).

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
        ("Start search", "Search per-layer bit-widths on this profile", "search"),
    ]

    # -- messages posted by the worker thread -----------------------------------------------------------

    class Status(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    class Prepared(Message):
        def __init__(self, genes: list[str], params: list[int], bits: list[int],
                     known: dict[tuple[int, int], float], total: int) -> None:
            super().__init__()
            self.genes, self.params, self.bits, self.known, self.total = genes, params, bits, known, total

    class Progress(Message):
        def __init__(self, event) -> None:
            super().__init__()
            self.event = event

    class Finished(Message):
        def __init__(self, profile, setup) -> None:
            super().__init__()
            self.profile, self.setup = profile, setup

    class Stopped(Message):
        def __init__(self, text: str, error: bool) -> None:
            super().__init__()
            self.text, self.error = text, error

    # -- state ----------------------------------------------------------------------------------------

    def __init__(self, cfg: RunConfig, autostart: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.autostart = autostart  # False: only show what is fed to it (benchmarks)
        self.state = "idle"  # idle | running | cancelling | done | cancelled | failed
        self.genes: list[str] = []
        self.params: list[int] = []
        self.bits: list[int] = list(cfg.bits)
        self.values: dict[tuple[int, int], float] = {}
        self.done = 0
        self.total = 0
        self.eta: float | None = None
        self.elapsed = 0.0
        self.started = 0.0
        self.status = ""
        self.reused = 0
        self.profile = None
        self.setup = None
        self.sort_index = 0  # 0 = layer order, 1 = name, 2 = params, 3.. = S columns
        self.sort_reverse = False
        self._dirty = True
        self._rows_dirty = True
        self._shown: dict[int, tuple] = {}  # what each table row shows (to update only changed cells)
        self._shown_order: list[int] = []
        self._shown_tops: dict[int, float] = {}
        self._shown_current = -1
        self._changed: set[int] = set()  # layers with new values since the last redraw
        self._next_redraw = 0.0
        self._stop = threading.Event()

    def compose(self) -> ComposeResult:
        yield Header()
        yield Label(self.cfg.summary(), id="profile-title", classes="dim")
        with Horizontal(classes="bar-row"):
            yield Label("overall", classes="bar-label")
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
        if self.autostart:
            self.start()

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        running = self.state in ("running", "cancelling")
        if action == "cancel":
            return running
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
        self.profile = None
        self._dirty = True
        self.refresh_bindings()
        self._work(self.cfg, self.app.storage_url)

    @work(thread=True, exclusive=True, group="profile", exit_on_error=False)
    def _work(self, cfg: RunConfig, url: str) -> None:
        """Engine calls only; every result goes back as a message."""
        from profiling.sensitivity import ProfileCancelled, prepare, run_profile
        from storage.profiles import ProfileStore

        worker = get_current_worker()

        def should_stop() -> bool:
            return self._stop.is_set() or worker.is_cancelled

        post = self.post_message
        store = None
        try:
            post(self.Status(f"loading model {cfg.model}..."))
            loaded = self.app.load_model(cfg.model)
            if should_stop():
                raise ProfileCancelled("cancelled")
            post(self.Status("tokenising the calibration text..."))
            setup = prepare(cfg.model, cfg.granularity, cfg.metric, cfg.group_size, cfg.calib_tokens,
                            cfg.heldout_tokens, cfg.seq_len, cfg.text_path, loaded=loaded)
            store = ProfileStore(url)
            known = {k: v for k, v in store.entries(setup.key).items() if k[1] in cfg.bits}
            genes = setup.inventory.gene_names()
            post(self.Prepared(genes, [g.params for g in setup.inventory.genes], list(cfg.bits), known,
                               len(genes) * len(cfg.bits)))
            post(self.Status("dense reference pass..." if len(known) < len(genes) * len(cfg.bits)
                             else "all entries cached: loading..."))
            profile = run_profile(setup, cfg.bits, store, progress=lambda e: post(self.Progress(e)),
                                  should_stop=should_stop)
            post(self.Finished(profile, setup))
        except ProfileCancelled:
            post(self.Stopped("cancelled: finished layers are saved; press r to resume", error=False))
        except Exception as exc:  # any failure becomes one line on screen, the traceback goes to the log
            log.exception("profiling failed")
            post(self.Stopped(one_line(exc), error=True))
        finally:
            if store is not None:
                store.close()

    # -- message handlers: record, mark dirty; the timer redraws --------------------------------------

    def on_profile_screen_status(self, message: Status) -> None:
        self.status = message.text
        self._dirty = True

    def on_profile_screen_prepared(self, message: Prepared) -> None:
        self.genes, self.params, self.bits = message.genes, message.params, message.bits
        self.values = dict(message.known)
        self.reused = len(message.known)
        self.total = message.total
        self.done = len(message.known)
        self._setup_columns()
        self._dirty = self._rows_dirty = True

    def on_profile_screen_progress(self, message: Progress) -> None:
        e = message.event
        self.done, self.total, self.elapsed = e.done, e.total, e.elapsed
        self.eta = e.eta_seconds
        if e.kind == "entry":
            self.values[(e.gene_index, e.bits)] = e.value
            self._changed.add(e.gene_index)
            self._rows_dirty = True
            self.status = f"measured {e.gene} at {e.bits} bits"
        elif e.kind == "start":
            self.status = "measuring..."
        self._dirty = True

    def on_profile_screen_finished(self, message: Finished) -> None:
        p = message.profile
        self.profile, self.setup = p, message.setup
        for i in range(p.n_genes):
            for j, b in enumerate(p.bits):
                self.values[(i, b)] = float(p.sensitivity[i, j])
        self._changed = set(range(p.n_genes))
        self.done = self.total = p.n_genes * len(p.bits)
        self.state = "done"
        reused = f", {p.reused_entries} of {self.total} entries reused from the cache" if p.reused_entries else ""
        dense = " (dense = the dequantised Q4_1 GGUF)" if p.model_id == "default" else ""
        self.status = (f"[b green]done[/] in {fmt_seconds(p.seconds)}{reused}. Dense loss {p.base_loss:.4f} "
                       f"(PPL {p.base_ppl:.2f}) measured{dense}. Press [b]s[/] to search.")
        if p.reused_entries:
            self.notify(f"Reused {p.reused_entries} cached measurements.", title="Profile")
        self._dirty = self._rows_dirty = True
        self.refresh_bindings()
        self._redraw()

    def on_profile_screen_stopped(self, message: Stopped) -> None:
        self.state = "failed" if message.error else "cancelled"
        self.status = f"[b red]error:[/] {message.text}" if message.error else message.text
        if message.error:
            self.notify(message.text, title="Profiling failed", severity="error", timeout=10)
        self._dirty = self._rows_dirty = True
        self.refresh_bindings()
        self._redraw()

    # -- drawing ------------------------------------------------------------------------------------

    def _sens_bits(self) -> list[int]:
        return [b for b in self.bits if b != 16]

    def _setup_columns(self) -> None:
        table = self.query_one("#sensitivity", DataTable)
        table.clear(columns=True)
        self._shown, self._shown_order = {}, []
        table.add_column("#", key="idx")
        table.add_column("layer", key="gene")
        table.add_column("params", key="params")
        table.add_column("done", key="state")
        for b in self._sens_bits():
            table.add_column(f"S@{b}", key=f"S{b}")

    def _gene_done(self, i: int) -> int:
        return sum((i, b) in self.values for b in self.bits)

    def _current_gene(self) -> int:
        if self.state != "running":
            return -1
        for i in range(len(self.genes)):
            if self._gene_done(i) < len(self.bits):
                return i
        return -1

    def _sort_key(self):
        sens = self._sens_bits()
        k = self.sort_index
        if k == 0:
            return lambda i: i
        if k == 1:
            return lambda i: self.genes[i]
        if k == 2:
            return lambda i: self.params[i]
        b = sens[k - 3]
        return lambda i: self.values.get((i, b), -math.inf)

    def sort_label(self) -> str:
        names = ["layer order", "name", "params"] + [f"S@{b}" for b in self._sens_bits()]
        return names[self.sort_index % len(names)]

    def _redraw(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        overall = self.query_one("#overall", ProgressBar)
        overall.update(total=max(self.total, 1), progress=self.done if self.total else 0)
        n = len(self.genes)
        finished = sum(self._gene_done(i) == len(self.bits) for i in range(n)) if n else 0
        self.query_one("#genes-bar", ProgressBar).update(total=max(n, 1), progress=finished)
        eta = "" if self.state != "running" else f"ETA {fmt_seconds(self.eta)}"
        self.query_one("#eta", Label).update(f"{self.done}/{self.total} {eta}")
        cur = self._current_gene()
        self.query_one("#gene-now", Label).update(
            f"{finished}/{n}" + (f"  now: {self.genes[cur]}" if cur >= 0 else ""))
        elapsed = time.monotonic() - self.started if self.state == "running" else None
        extra = f"  [dim]({fmt_seconds(elapsed)} elapsed; sort: {self.sort_label()})[/]" if elapsed else (
            f"  [dim](sort: {self.sort_label()})[/]" if self.genes else "")
        self.query_one("#profile-status", Label).update(self.status + extra)
        if self._rows_dirty:
            self._rows_dirty = False
            self._fill_rows(cur)

    def _row_cells(self, i: int, current: int, tops: dict[int, float]) -> list:
        done = self._gene_done(i)
        if done == len(self.bits):
            state = Text("✓", style="green")
        elif i == current:
            state = Text("▶", style="bold yellow")
        else:
            state = Text(f"{done}/{len(self.bits)}" if done else "·", style="dim")
        cells = [str(i), self.genes[i], f"{self.params[i]:,}", state]
        for b in self._sens_bits():
            v = self.values.get((i, b))
            cells.append(Text("" if v is None else f"{v:.5f}", style=heat_style(v, tops[b]) if v is not None
                              else "", justify="right"))
        return cells

    @staticmethod
    def _signature(cells: list) -> tuple:
        return tuple((str(c), str(getattr(c, "style", ""))) for c in cells)

    def _fill_rows(self, current: int) -> None:
        """Update the cells that changed; rebuild only when the row order changes (a resort)."""
        table = self.query_one("#sensitivity", DataTable)
        sens = self._sens_bits()
        tops = {b: max([v for (i, bb), v in self.values.items() if bb == b] or [0.0]) for b in sens}
        order = sorted(range(len(self.genes)), key=self._sort_key(), reverse=self.sort_reverse)
        same_layout = order == self._shown_order and table.row_count == len(order)
        if same_layout and tops == self._shown_tops:
            # only the layers that got values, and the old and new "measuring" marks, can differ
            todo = self._changed | {current, self._shown_current} - {-1}
        else:
            todo = set(order)
        self._changed = set()
        self._shown_tops, self._shown_current = tops, current
        cells = {i: self._row_cells(i, current, tops) for i in todo}
        if same_layout:
            keys = ["idx", "gene", "params", "state"] + [f"S{b}" for b in sens]
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
        n = 3 + len(self._sens_bits())
        self.sort_index = (self.sort_index + 1) % n
        self.sort_reverse = self.sort_index >= 2  # big first for numbers
        self._dirty = self._rows_dirty = True
        self._redraw()

    @on(DataTable.HeaderSelected)
    def _header(self, event: DataTable.HeaderSelected) -> None:
        index = {"idx": 0, "gene": 1, "params": 2, "state": 0}.get(str(event.column_key.value))
        if index is None:
            index = 3 + self._sens_bits().index(int(str(event.column_key.value)[1:]))
        if index == self.sort_index:
            self.sort_reverse = not self.sort_reverse
        else:
            self.sort_index, self.sort_reverse = index, index >= 2
        self._dirty = self._rows_dirty = True
        self._redraw()

    def action_search(self) -> None:
        if self.state != "done" or self.profile is None:
            self.notify("The profile is not complete yet.", severity="warning")
            return
        from .search import SearchScreen

        self.app.push_screen(SearchScreen.new(self.cfg, self.profile, self.setup))

    def on_unmount(self) -> None:
        self._stop.set()
