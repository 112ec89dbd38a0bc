"""Search: the live Pareto front of memory vs loss while NSGA-II runs, and the genes of any point.

The worker calls the search job (:func:`empas_tui.jobs.search.run_search_job`: one event per
generation) and posts each event; the screen keeps the latest and redraws at most 4 times a second.
The front shown is the engine's (:mod:`search.pareto`: distinct non-dominated points), the same one
the studies list and the archetypes screen count. Pausing asks the job to stop after the generation
in flight, which the engine writes in one transaction: the study is always consistent, and resuming
(here, from the studies screen, or ``empas search --study NAME``) continues with the next generation.
"""

from __future__ import annotations

import logging
import math
import threading

import numpy as np
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Label
from textual.worker import get_current_worker

from ..config import RunConfig, settings_from_profile
from ..format import MIB, fit_parts, fmt_seconds, layer_rows, one_line, point_summary, rise_text
from ..messages import ExactFrontReady, FrontLoaded, PointClicked, PresetsReady, SearchEnded, SearchProgress
from ..redraw import REDRAW_SECONDS, ThrottledRedraw
from ..widgets.bitstrip import BitStrip, QtypePalette
from ..widgets.pareto import ParetoPlot

log = logging.getLogger(__name__)

NARROW_COLUMNS = 110
PLOT_PPL_FACTOR = 2.0  # the plot shows points up to this multiple of the dense perplexity (z: all)
HISTORY_DRAWN = 2000  # earlier-front points drawn (the most recent ones)


class SearchScreen(ThrottledRedraw, Screen):
    TITLE_TEXT = "Search"
    HELP = """\
NSGA-II evolves a type per layer; every trial is scored on two objectives: **memory** (from the
quantiser's storage layout) and **predicted loss** (dense loss + the sum of the profiled layer
sensitivities: a prediction, measured later on the archetypes screen).

The plot: bright dots = the study's current Pareto front (distinct points: the count every screen and
`empas studies` show), grey dots = points of earlier fronts, green line = the *exact* front of the
proxy (the best any search can reach on the predicted loss), magenta diamond = the selected point,
orange crosses = llama.cpp's presets of a ggml study at their exact file size and *predicted* loss
(only the presets the profile's genes can express; the archetypes screen lists all of them).
*HV ratio* = hypervolume of the front / that of the exact front.

| key | action |
|---|---|
| `up`/`down` | select a front point (or click it in the plot) |
| `enter` | the selected point's layers in full screen |
| `p` / `space` | pause (after the current generation; nothing is lost) / run another batch of trials |
| `z` | plot: points up to 2x the dense perplexity (default) / everything |
| `a` | archetypes: pick, measure and export |
| `escape` | back (pauses first) |
"""
    BINDINGS = [
        Binding("p,space", "toggle", "Pause/Run"),
        Binding("a", "archetypes", "Archetypes"),
        Binding("enter", "details", "Layers", show=False),
        Binding("z", "zoom", "Zoom", show=False),
        Binding("escape", "back", "Back"),
    ]
    PALETTE = [
        ("Pause search", "Stop after the current generation (resume any time)", "toggle"),
        ("Resume search", "Run more trials of this study", "toggle"),
        ("Archetypes", "Pick, measure and export archetypes from this front", "archetypes"),
        ("Point layers", "Show the selected point's type per layer", "details"),
    ]

    def __init__(self, study: str, cfg: RunConfig | None = None, profile_job=None) -> None:
        super().__init__()
        self.study = study
        self.cfg = cfg
        self.profile_job = profile_job  # the finished profile a new study starts from (model and tokens)
        self.profile = profile_job.profile if profile_job is not None else None
        self.autostart = profile_job is not None
        self.state = "loading"  # loading | running | pausing | paused | done | failed
        self.points: list = []
        self.history: dict[tuple[int, float], None] = {}
        self.exact_xy = np.zeros((0, 2))
        self.exact_count = 0
        self.presets: list = []  # ggml: jobs.baselines.PresetBaseline (drawn when predicted)
        self.selected_trial: int | None = None
        self.event = None
        self.trials_total = 0
        self.hv_ratio: float | None = None
        self.evaluate = (cfg.search.evaluate if cfg is not None else None) or "proxy"
        self.max_mib = cfg.search.max_mib if cfg is not None else None
        self.message = ""
        self.full_range = False
        self.clipped = False
        self._layers_for: int | None = None
        self._front_shown: list[tuple] = []
        self._dirty = self._table_dirty = True
        self._next_redraw = 0.0
        self._stop = threading.Event()
        self.run_finished = threading.Event()  # set when the job has returned (tests, quitting)
        self.run_finished.set()
        self.more_trials = cfg.search.trials if cfg is not None else None  # None: the default run length
        self.study_exists = profile_job is None  # a new study exists once the engine has reported on it

    # -- layout -----------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        yield Label("", id="search-stats")
        with Horizontal(id="search-main"):
            yield ParetoPlot(id="pareto")
            with Vertical(id="search-side"):
                yield Label("Pareto front (predicted PPL)", classes="section", id="front-title")
                yield DataTable(id="front", cursor_type="row", zebra_stripes=True)
                yield DataTable(id="layers", cursor_type="row", zebra_stripes=True)
        yield Label("", id="point-line")
        yield BitStrip(id="strip")
        yield Label("", id="strip-legend")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"search {self.study}"
        front = self.query_one("#front", DataTable)
        front.add_columns("trial", "MiB", "bits", "PPL", "rise")
        self.query_one("#layers", DataTable).add_columns("layer", "type", "params", "pred. KL")
        self.set_interval(REDRAW_SECONDS, self._tick)
        self._apply_width(self.size.width)
        front.focus()
        if self.profile is not None:
            self._exact(self.profile, {"max_mib": self.max_mib})
            self._start_presets()
        if self.autostart:
            self.start_run()
        elif self.profile is None:  # opened from the list: the stored front first
            self._load()

    def on_resize(self, event) -> None:
        self._apply_width(event.size.width)
        self._layers_for = None  # the per-layer table may have just appeared
        self._dirty = True

    def _apply_width(self, width: int) -> None:
        self.set_class(width < NARROW_COLUMNS, "narrow")

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action == "toggle":
            return self.state in ("running", "paused", "done", "failed")
        if action == "archetypes":
            return bool(self.points) or None
        return True

    # -- workers: catalogue and job layer only ------------------------------------------------------

    @work(thread=True, exclusive=True, group="search-load", exit_on_error=False)
    def _load(self) -> None:
        from search.catalogue import load_front

        try:
            front = load_front(self.app.db, self.study)
        except Exception as exc:
            log.exception("loading study failed")
            self.post_message(FrontLoaded(error=one_line(exc)))
            return
        self.post_message(FrontLoaded(front))
        self._exact_points(front.profile, front.settings)
        if front.profile.quantizer.get("name") == "ggml":
            self._preset_points(front.profile)

    @work(thread=True, group="search-exact", exit_on_error=False)
    def _exact(self, profile, settings: dict) -> None:
        self._exact_points(profile, settings)

    def _exact_points(self, profile, settings: dict) -> None:
        from search.catalogue import exact_points
        from search.settings import SearchSettings
        from search.space import SearchSpace

        try:
            pts = exact_points(SearchSpace.from_profile(profile),
                               SearchSettings(max_mib=settings.get("max_mib"), min_avg_bits=settings.get("min_avg_bits")))
        except Exception:
            log.exception("exact front failed")
            return
        xy = np.array([[p.memory_bytes / MIB, p.predicted_loss] for p in pts]) if pts else np.zeros((0, 2))
        self.post_message(ExactFrontReady(xy, len(pts)))

    def _start_presets(self) -> None:
        if self.profile is not None and self.profile.quantizer.get("name") == "ggml":
            self._presets(self.profile)

    @work(thread=True, group="search-presets", exit_on_error=False)
    def _presets(self, profile) -> None:
        self._preset_points(profile)

    def _preset_points(self, profile) -> None:
        """llama.cpp's presets on this model (the model is loaded once per session, in the app)."""
        from ...jobs.baselines import profile_presets

        try:
            setup = self.profile_job.setup if self.profile_job is not None else None
            if setup is not None:
                loaded = setup.loaded
                layout = setup.memory.layout if setup.memory.basis == "gguf file" else None
            else:  # a study opened from the list: only if its model is in memory (loading it could take minutes)
                loaded, layout = self.app.cached_model(profile.model_fingerprint), None
                if loaded is None:
                    return
            presets = profile_presets(profile, loaded, layout)
        except Exception:  # a model with no GGUF layout: no presets on the plot (the log says why)
            log.exception("llama.cpp presets failed")
            return
        self.post_message(PresetsReady(presets))

    def on_presets_ready(self, message: PresetsReady) -> None:
        self.presets = list(message.presets)
        self._dirty = True

    def start_run(self) -> None:
        from search.settings import SearchSettings

        if self.profile is None:
            self.notify("The study is still loading.", severity="warning")
            return
        if self.cfg is not None and not self.study_exists:  # a new study: the setup's choices
            settings = self.cfg.search
        else:  # resume: the stored settings, another batch of trials
            settings = SearchSettings(study_name=self.study, trials=self.more_trials)
        self._stop.clear()
        self.run_finished.clear()
        self.state = "running"
        self.message = "starting..."
        self._dirty = True
        self.refresh_bindings()
        self._run(settings)

    @work(thread=True, exclusive=True, group="search-run", exit_on_error=False)
    def _run(self, settings) -> None:
        from ...jobs.search import run_search_job

        worker = get_current_worker()
        post = self.post_message

        def should_stop() -> bool:
            return self._stop.is_set() or worker.is_cancelled

        def profile_progress(e) -> None:
            if e.kind == "start":
                post(SearchProgress(status=f"profile: {e.done}/{e.total} cells stored, measuring the rest..."))

        try:
            profile_settings = self.cfg.profile if self.cfg is not None else settings_from_profile(self.profile)
            loaded = self.profile_job.setup.loaded if self.profile_job is not None else None
            if self.evaluate == "measured":
                if loaded is None:
                    post(SearchProgress(status="loading the model for measured evaluation..."))
                    loaded = self.app.load_model(profile_settings.model, self.profile.model_fingerprint)
                post(SearchProgress(status="dense reference pass for measured evaluation..."))
            job = run_search_job(profile_settings, settings, self.app.db, profile_progress=profile_progress,
                                 search_progress=lambda e: post(SearchProgress(e)), should_stop=should_stop,
                                 loaded=loaded)
        except Exception as exc:
            log.exception("search failed")
            post(SearchEnded(error=one_line(exc)))
            return
        finally:
            self.run_finished.set()
        post(SearchEnded(job))

    # -- messages ---------------------------------------------------------------------------------

    def _take_front(self, points) -> None:
        for p in self.points:  # what leaves the front stays visible, dimmed
            self.history[(p.memory_bytes, p.loss)] = None
        self.points = list(points)
        if self.points and self.selected_index() is None:
            self.selected_trial = self.points[len(self.points) // 2].trial_number
        self._dirty = self._table_dirty = True

    def on_front_loaded(self, message: FrontLoaded) -> None:
        if message.error:
            self.state = "failed"
            self.message = f"[b red]error:[/] {message.error}"
            self.notify(message.error, title="Search", severity="error", timeout=10)
            self._dirty = True
            self.refresh_bindings()
            return
        f = message.front
        self.profile = f.profile
        self.trials_total = f.trials_complete
        self.hv_ratio = f.hypervolume_ratio
        self.evaluate = f.evaluate
        self.max_mib = f.settings.get("max_mib")
        self._take_front(f.points)
        self.state = "paused"
        self.message = (f"loaded: {f.trials_complete:,} trials, {len(self.points)} front points. "
                        f"[b]p[/] runs more trials, [b]a[/] archetypes.")
        self.refresh_bindings()

    def on_exact_front_ready(self, message: ExactFrontReady) -> None:
        self.exact_xy, self.exact_count = message.xy, message.count
        self._dirty = True

    def on_search_progress(self, message: SearchProgress) -> None:
        if message.event is None:
            self.message = message.status
            self._dirty = True
            return
        e = message.event
        self.event = e
        self.study_exists = True
        self.trials_total = e.trials_total
        self.hv_ratio = e.hypervolume_ratio
        self._take_front(e.front)
        if e.kind in ("start", "generation", "trial") and self.state == "running":
            self.message = f"generation {e.generation}: running... ([b]p[/] pauses)"

    def on_search_ended(self, message: SearchEnded) -> None:
        if message.error:
            self.state = "failed"
            self.message = f"[b red]error:[/] {message.error}"
            self.notify(message.error, title="Search", severity="error", timeout=10)
        else:
            r = message.job.result
            self.study_exists = True
            self.state = "paused" if r.stopped else "done"
            self._take_front(r.front)
            self.trials_total = r.trials_total
            self.hv_ratio = r.hypervolume_ratio
            self.evaluate = r.evaluate
            what = "paused" if r.stopped else "finished"
            self.message = (f"{what}: {r.trials_run:,} trials in {fmt_seconds(r.seconds)} "
                            f"({r.trials_per_s:.0f}/s), {len(self.points)} front points. "
                            f"[b]p[/] {'resumes' if r.stopped else 'runs more'}, [b]a[/] archetypes.")
            if message.job.note:
                self.notify(message.job.note, title="Profile", timeout=8)
            self.notify(f"Search {what}: {len(self.points)} points on the front.", title=self.study)
        self._dirty = self._table_dirty = True
        self.refresh_bindings()
        self._redraw()

    # -- drawing ----------------------------------------------------------------------------------

    def selected_index(self) -> int | None:
        for i, p in enumerate(self.points):
            if p.trial_number == self.selected_trial:
                return i
        return None

    def selected_point(self):
        i = self.selected_index()
        return None if i is None else self.points[i]

    def stats_text(self, width: int) -> str:
        """The status line, least important parts left out until it fits ``width``."""
        e = self.event
        parts = [(0, f"[b]{self.study}[/]"), (0, self.state)]
        if self.evaluate == "measured":
            parts.append((1, "[b]measured[/]"))
        if e is not None and self.state in ("running", "pausing"):
            parts += [(4, f"gen {e.generation}"), (3, f"run {e.trials_done:,}/{e.trials_target:,}"),
                      (5, f"{e.trials_per_s:.0f} trials/s"), (6, fmt_seconds(e.elapsed))]
        parts.append((1, f"{self.trials_total:,} trials"))
        if self.hv_ratio is not None:
            parts.append((2, f"HV ratio {self.hv_ratio:.4f}"))
        parts.append((0, f"front {len(self.points)}"))
        if self.clipped:
            parts.append((7, f"[dim]plot PPL<={PLOT_PPL_FACTOR:g}x (z)[/]"))
        return fit_parts(parts, width)

    def _redraw(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        if self._table_dirty:
            self._table_dirty = False
            self._fill_front()
        sel = self.selected_index()
        measured = self.evaluate == "measured"
        front = np.array([[p.memory_bytes / MIB, p.loss] for p in self.points]) if self.points else np.zeros((0, 2))
        recent = list(self.history)[-HISTORY_DRAWN:]
        hist = np.array([[m / MIB, l] for (m, l) in recent]) if recent else np.zeros((0, 2))
        label = "measured loss" if measured else "predicted loss"
        y_max = None
        self.clipped = False
        if not self.full_range and self.profile is not None:
            y_max = self.profile.base_loss + math.log(PLOT_PPL_FACTOR)
            if not len(front) or (front[:, 1] > y_max).all():
                y_max = None  # nothing that good yet: show everything rather than an empty plot
            else:
                self.clipped = True
        presets = [] if measured else [[p.file_bytes / MIB, p.predicted_loss] for p in self.presets
                                       if p.predicted_loss is not None]
        self.query_one(ParetoPlot).draw(front, hist, self.exact_xy if not measured else np.zeros((0, 2)), sel,
                                        label, y_max, baselines=np.array(presets) if presets else None)
        stats = self.query_one("#search-stats", Label)
        stats.update(self.stats_text(max(self.size.width - 2, 20)))
        self._show_point()

    def _fill_front(self) -> None:
        shown = [(p.trial_number, p.memory_bytes, p.loss) for p in self.points]
        if shown == self._front_shown:  # a generation that did not change the front: keep the table
            return
        self._front_shown = shown
        table = self.query_one("#front", DataTable)
        table.clear()
        base = self.profile.base_loss if self.profile is not None else 0.0
        for p in self.points:
            ppl = math.exp(min(p.loss, 700.0))
            table.add_row(str(p.trial_number), f"{p.memory_bytes / MIB:.1f}", f"{p.average_bits or 0:.2f}",
                          f"{ppl:.4g}", rise_text(p.loss - base), key=str(p.trial_number))
        self.query_one("#front-title", Label).update(
            f"Pareto front: {len(self.points)} points ({'measured' if self.evaluate == 'measured' else 'predicted'})")
        sel = self.selected_index()
        if sel is not None:
            table.move_cursor(row=sel, animate=False, scroll=True)

    def _show_point(self) -> None:
        p = self.selected_point()
        line = self.query_one("#point-line", Label)
        strip = self.query_one("#strip", BitStrip)
        if p is None or self.profile is None:
            line.update(self.message)
            strip.show([])
            self.query_one("#strip-legend", Label).update("")
            return
        palette = QtypePalette.of(self.profile)
        line.update(Text.from_markup(self.message + "\n") + Text(point_summary(p, self.profile), style="bold"))
        blocks = self.profile.gene_blocks if self.profile.granularity != "block" else None
        strip.show(p.qtypes, palette, blocks)
        self.query_one("#strip-legend", Label).update(palette.legend(p.qtypes))
        layers = self.query_one("#layers", DataTable)
        if layers.display and self._layers_for != p.trial_number:
            self._layers_for = p.trial_number
            layers.clear()
            for i, name, block, q, params, kl in layer_rows(self.profile, p.qtypes):
                layers.add_row(name, palette.cell(q), f"{params:,}", f"{kl:.5f}")

    # -- selection and actions --------------------------------------------------------------------

    @on(DataTable.RowHighlighted, "#front")
    def _front_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key is None or event.row_key.value is None:
            return
        trial = int(event.row_key.value)
        if trial != self.selected_trial:
            self.selected_trial = trial
            self._dirty = True

    @on(DataTable.RowSelected, "#front")
    def _front_selected(self, event: DataTable.RowSelected) -> None:
        self.action_details()

    def on_point_clicked(self, event: PointClicked) -> None:
        if 0 <= event.index < len(self.points):
            self.selected_trial = self.points[event.index].trial_number
            self.query_one("#front", DataTable).move_cursor(row=event.index)
            self._dirty = True

    def select_index(self, index: int) -> None:
        """Select a front point by position (memory ascending), as the arrow keys do."""
        self.query_one("#front", DataTable).move_cursor(row=index)
        self.selected_trial = self.points[index].trial_number
        self._dirty = True
        self._redraw()

    def action_toggle(self) -> None:
        if self.state == "running":
            self._stop.set()
            self.state = "pausing"
            self.message = "pausing after the current generation..."
            self._dirty = True
            self.refresh_bindings()
        elif self.state in ("paused", "done", "failed") and self.profile is not None:
            self.start_run()

    def action_zoom(self) -> None:
        self.full_range = not self.full_range
        self._dirty = True
        self._redraw()

    def action_details(self) -> None:
        p = self.selected_point()
        if p is not None and self.profile is not None:
            self.app.open_point(self.study, p, self.profile)

    def action_archetypes(self) -> None:
        if not self.points:
            return
        if self.state == "running":
            self.notify("The archetypes use the front as it is now; the search keeps running.", timeout=4)
        self.app.open_archetypes(self.study, self.cfg.profile.model if self.cfg is not None else None)

    def action_back(self) -> None:
        if self.state == "running":
            self.action_toggle()
            self.notify("Pausing the search; escape again goes back.", timeout=3)
            return
        self.app.pop_screen()

    def on_unmount(self) -> None:
        self._stop.set()
