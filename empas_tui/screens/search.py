"""Search: the live Pareto front of memory vs loss while NSGA-II runs, and the layers of any point.

The worker calls ``search.study.run_search`` (one event per generation) and posts each event; the
screen keeps the latest and redraws at most 4 times a second. Pausing asks the engine to stop after
the generation in flight, which it writes in one transaction: the study is always consistent, and
resuming (here, from the studies screen, or ``empas search`` with the same study name) continues with
the next generation.
"""

from __future__ import annotations

import logging
import math
import threading
import time

import numpy as np
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Label
from textual.worker import get_current_worker

from ..widgets.bitstrip import BitStrip, bit_style, legend
from ..widgets.pareto import ParetoPlot
from .profile import fmt_seconds
from .state import RunConfig, one_line
from .redraw import REDRAW_SECONDS, ThrottledRedraw

log = logging.getLogger(__name__)

NARROW_COLUMNS = 110
PLOT_PPL_FACTOR = 2.0  # the plot shows points up to this multiple of the dense perplexity (z: all)
RESUME_GENERATIONS = 10  # what "resume" adds to a study opened from the list
HISTORY_DRAWN = 2000  # earlier-front points drawn (the most recent ones)
MIB = 1024 * 1024


def archetypes_available() -> bool:
    """The archetypes screen needs ``search.archetypes`` and ``profiling.validation`` (issue 4)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("search.archetypes", "profiling.validation"))


def unique_points(points) -> list:
    """One row per distinct (memory, loss): NSGA-II re-finds the same genome, and the engine's weak
    front keeps every copy; the lowest trial number stands for them."""
    seen, out = set(), []
    for p in sorted(points, key=lambda p: (p.memory_bytes, p.loss, p.trial_number)):
        key = (p.memory_bytes, round(p.loss, 12))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def rise_text(delta_loss: float) -> str:
    """PPL change over dense: '+3.2%' when small, 'x41' when the genome ruins the model."""
    ratio = math.exp(min(delta_loss, 700.0))
    return f"{100.0 * (ratio - 1):+.1f}%" if ratio < 10 else f"x{ratio:.3g}"


def layer_rows(profile, bits: list[int]) -> list[tuple]:
    """(index, layer, block, bits, params, predicted KL of that layer at its width) per gene."""
    idx = profile.bit_index(bits)
    return [(i, profile.gene_names[i], profile.gene_blocks[i], int(bits[i]), int(profile.gene_params[i]),
             float(profile.sensitivity[i, idx[i]])) for i in range(profile.n_genes)]


def point_summary(point, profile) -> str:
    text = (f"trial {point.trial_number}  {point.memory_bytes / MIB:.2f} MiB  avg {point.average_bits or 0:.2f} bits  "
            f"predicted loss {point.predicted_loss:.4f} (PPL {math.exp(min(point.predicted_loss, 700)):.4g}, "
            f"{rise_text(point.predicted_loss - profile.base_loss)})")
    if point.measured and point.measured.get("loss") is not None:
        text += f"  measured loss {point.measured['loss']:.4f}"
    return text


class SearchScreen(ThrottledRedraw, Screen):
    TITLE_TEXT = "Search"
    HELP = """\
NSGA-II evolves per-layer bit-widths; every trial is scored on two objectives: **memory** (from the
quantiser's storage layout) and **predicted loss** (dense loss + the sum of the profiled layer
sensitivities: a prediction, measured later on the archetypes screen).

The plot: bright dots = the study's current Pareto front, grey dots = points of earlier fronts, green
line = the *exact* front of the proxy (the best any search can reach on the predicted loss), magenta
diamond = the selected point. *HV ratio* = hypervolume of the front / that of the exact front.

| key | action |
|---|---|
| `up`/`down` | select a front point (or click it in the plot) |
| `enter` | the selected point's layers in full screen |
| `p` / `space` | pause (after the current generation; nothing is lost) / resume |
| `z` | plot: points up to 2x the dense perplexity (default) / everything |
| `a` | archetypes: pick, measure and export |
| `escape` | back (pauses first) |
"""
    BINDINGS = [
        Binding("p,space", "toggle", "Pause/Resume"),
        Binding("a", "archetypes", "Archetypes"),
        Binding("enter", "details", "Layers", show=False),
        Binding("z", "zoom", "Zoom", show=False),
        Binding("escape", "back", "Back"),
    ]
    PALETTE = [
        ("Pause search", "Stop after the current generation (resume any time)", "toggle"),
        ("Resume search", "Run more generations of this study", "toggle"),
        ("Archetypes", "Pick, measure and export archetypes from this front", "archetypes"),
        ("Point layers", "Show the selected point's bit-width per layer", "details"),
    ]

    class Loaded(Message):
        def __init__(self, front) -> None:
            super().__init__()
            self.front = front

    class Exact(Message):
        def __init__(self, xy: np.ndarray, count: int) -> None:
            super().__init__()
            self.xy, self.count = xy, count

    class Progress(Message):
        def __init__(self, event, status: str = "") -> None:
            super().__init__()
            self.event, self.status = event, status

    class Ended(Message):
        def __init__(self, result=None, error: str = "") -> None:
            super().__init__()
            self.result, self.error = result, error

    def __init__(self, study: str, cfg: RunConfig | None = None, profile=None, setup=None,
                 start: bool = False) -> None:
        super().__init__()
        self.study = study
        self.cfg = cfg
        self.profile = profile
        self.setup = setup  # the model/tokens of a profile run, reused to measure archetypes
        self.autostart = start
        self.state = "loading"  # loading | running | pausing | paused | done | failed
        self.points: list = []
        self.history: dict[tuple[int, float], None] = {}
        self.exact_xy = np.zeros((0, 2))
        self.exact_count = 0
        self.selected_trial: int | None = None
        self.event = None
        self.settings: dict = {}
        self.trials_total = 0
        self.hv_ratio: float | None = None
        self.evaluate = "proxy"
        self.message = ""
        self.full_range = False
        self.clipped = False
        self._layers_for: int | None = None
        self._front_shown: list[tuple] = []
        self._dirty = self._table_dirty = True
        self._next_redraw = 0.0
        self._stop = threading.Event()
        self.run_finished = threading.Event()  # set when the engine call has returned (tests, quitting)
        self.run_finished.set()
        self.more_generations = cfg.generations if cfg is not None else RESUME_GENERATIONS
        self.study_exists = not start  # a new study exists once the engine has reported on it

    @classmethod
    def new(cls, cfg: RunConfig, profile, setup) -> "SearchScreen":
        return cls(cfg.study, cfg, profile, setup, start=True)

    @classmethod
    def for_study(cls, name: str) -> "SearchScreen":
        return cls(name)

    # -- layout -----------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        yield Label("", id="search-stats")
        with Horizontal(id="search-main"):
            yield ParetoPlot(id="pareto")
            with Vertical(id="search-side"):
                yield Label("Pareto front (predicted PPL)", classes="section")
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
        layers = self.query_one("#layers", DataTable)
        layers.add_columns("layer", "bits", "params", "pred. KL")
        self.set_interval(REDRAW_SECONDS, self._tick)
        self._apply_width(self.size.width)
        front.focus()
        if self.profile is not None:
            self._compute_exact(self.profile, self.cfg)
        if self.autostart:
            self.start_run()
        elif self.profile is None:  # opened from the list: the stored front first
            self._load(self.app.storage_url, self.study)

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
            if not archetypes_available():
                return False
            return bool(self.points) or None
        return True

    # -- workers ----------------------------------------------------------------------------------

    @work(thread=True, exclusive=True, group="search-load", exit_on_error=False)
    def _load(self, url: str, name: str) -> None:
        from search.study import load_front

        try:
            front = load_front(url, name)
        except Exception as exc:
            log.exception("loading study failed")
            self.post_message(self.Ended(error=one_line(exc)))
            return
        self.post_message(self.Loaded(front))
        self._exact_worker(front.profile, front.settings)

    def _compute_exact(self, profile, cfg) -> None:
        self._exact_thread(profile, {"max_mib": cfg.max_mib} if cfg is not None else {})

    @work(thread=True, group="search-exact", exit_on_error=False)
    def _exact_thread(self, profile, settings: dict) -> None:
        self._exact_worker(profile, settings)

    def _exact_worker(self, profile, settings: dict) -> None:
        from search.space import SearchSpace
        from search.study import SearchSettings, exact_points

        try:
            space = SearchSpace.from_profile(profile)
            cons = SearchSettings(max_mib=settings.get("max_mib"), min_avg_bits=settings.get("min_avg_bits"))
            pts = exact_points(space, cons)
        except Exception:
            log.exception("exact front failed")
            return
        xy = np.array([[p.memory_bytes / MIB, p.predicted_loss] for p in pts]) if pts else np.zeros((0, 2))
        self.post_message(self.Exact(xy, len(pts)))

    def start_run(self) -> None:
        from search.study import SearchSettings

        if self.profile is None:
            self.notify("The study is still loading.", severity="warning")
            return
        if self.cfg is not None and not self.study_exists:  # a new study: the setup's choices
            settings = SearchSettings(study_name=self.study, population=self.cfg.population,
                                      generations=self.cfg.generations, seed=self.cfg.seed,
                                      evaluate=self.cfg.evaluate, max_mib=self.cfg.max_mib)
            self.evaluate = self.cfg.evaluate
        else:  # resume: the stored settings, this many more generations
            settings = SearchSettings(study_name=self.study, generations=self.more_generations)
        self._stop.clear()
        self.run_finished.clear()
        self.state = "running"
        self.message = "starting..."
        self._dirty = True
        self.refresh_bindings()
        self._run(settings, self.profile, self.app.storage_url, self.evaluate == "measured")

    def _measuring_runner(self, profile):
        """Measured mode needs the model and the calibration tokens: the profile run's, or rebuilt
        from the profile's description (refused if they would not be the same tokens)."""
        from profiling.runner import PrefixRunner

        setup = self.setup
        if setup is None:
            from profiling.sensitivity import prepare

            self.post_message(self.Progress(None, status="loading the model for measured evaluation..."))
            loaded = self.app.load_model(profile.model_id)
            corpus = None if profile.corpus_source == "default" else profile.corpus_source
            setup = prepare(profile.model_id, profile.granularity, profile.metric,
                            int(profile.quantizer.get("group_size", 64)), profile.calibration_tokens,
                            text_file=corpus, loaded=loaded)
            if setup.tokens.fingerprint != profile.corpus_fingerprint:
                raise ValueError("cannot rebuild this study's calibration tokens here (other sequence length or "
                                 "held-out size): resume it with `empas search --evaluate measured` and the "
                                 "profile's options")
        self.post_message(self.Progress(None, status="dense reference pass for measured evaluation..."))
        return PrefixRunner(setup.loaded.model, setup.inventory, setup.tokens.calibration)

    @work(thread=True, exclusive=True, group="search-run", exit_on_error=False)
    def _run(self, settings, profile, url: str, measured: bool = False) -> None:
        from search.study import run_search

        worker = get_current_worker()

        def should_stop() -> bool:
            return self._stop.is_set() or worker.is_cancelled

        try:
            runner = self._measuring_runner(profile) if measured else None
            result = run_search(settings, profile, url, progress=lambda e: self.post_message(self.Progress(e)),
                                should_stop=should_stop, runner=runner)
        except Exception as exc:
            log.exception("search failed")
            self.post_message(self.Ended(error=one_line(exc)))
            return
        finally:
            self.run_finished.set()
        self.post_message(self.Ended(result))

    # -- messages ---------------------------------------------------------------------------------

    def on_search_screen_loaded(self, message: Loaded) -> None:
        f = message.front
        self.profile = f.profile
        self.points = unique_points(f.points)
        self.settings = f.settings
        self.trials_total = f.trials_complete
        self.hv_ratio = f.hypervolume_ratio
        self.evaluate = f.evaluate
        self.state = "paused"
        self.message = (f"loaded: {f.trials_complete} trials, {len(self.points)} front points. "
                        f"Press [b]p[/] to run more generations, [b]a[/] for archetypes.")
        if self.points and self.selected_trial is None:
            self.selected_trial = self.points[len(self.points) // 2].trial_number
        self._dirty = self._table_dirty = True
        self.refresh_bindings()

    def on_search_screen_exact(self, message: Exact) -> None:
        self.exact_xy, self.exact_count = message.xy, message.count
        self._dirty = True

    def on_search_screen_progress(self, message: Progress) -> None:
        if message.event is None:
            self.message = message.status
            self._dirty = True
            return
        e = message.event
        self.event = e
        self.study_exists = True
        self.trials_total = e.trials_total
        self.hv_ratio = e.hypervolume_ratio
        for p in self.points:  # what leaves the front stays visible, dimmed
            self.history[(p.memory_bytes, p.loss)] = None
        self.points = unique_points(e.front)
        if self.points and self.selected_trial is None:
            self.selected_trial = self.points[len(self.points) // 2].trial_number
        if e.kind == "start":
            self.message = f"generation {e.generation}: running..."
        self._dirty = self._table_dirty = True

    def on_search_screen_ended(self, message: Ended) -> None:
        if message.error:
            self.state = "failed"
            self.message = f"[b red]error:[/] {message.error}"
            self.notify(message.error, title="Search", severity="error", timeout=10)
        else:
            r = message.result
            self.study_exists = True
            self.state = "paused" if r.stopped else "done"
            self.points = unique_points(r.front)
            self.trials_total = r.trials_total
            self.hv_ratio = r.hypervolume_ratio
            self.evaluate = r.evaluate
            self.settings = r.settings
            what = "paused" if r.stopped else "finished"
            self.message = (f"{what}: {r.trials_run} trials this run in {fmt_seconds(r.seconds)} "
                            f"({r.trials_per_s:.0f}/s), {len(self.points)} front points. "
                            f"[b]p[/] {'resume' if r.stopped else 'run more'}, [b]a[/] archetypes.")
            self.notify(f"Search {what}: {len(self.points)} points on the front.", title=self.study)
        self._dirty = self._table_dirty = True
        self.refresh_bindings()
        self._redraw()

    # -- drawing ----------------------------------------------------------------------------------

    def selected_index(self) -> int | None:
        if not self.points:
            return None
        for i, p in enumerate(self.points):
            if p.trial_number == self.selected_trial:
                return i
        return None

    def selected_point(self):
        i = self.selected_index()
        return None if i is None else self.points[i]

    def _stats_text(self) -> str:
        e = self.event
        parts = [f"[b]{self.study}[/]", self.state]
        if self.evaluate == "measured":
            parts.append("[b]measured[/]")
        if e is not None:
            parts += [f"gen {e.generation}", f"run {e.trials_done}/{e.trials_target}",
                      f"{e.trials_per_s:.0f} trials/s", f"{fmt_seconds(e.elapsed)}"]
        parts.append(f"{self.trials_total:,} trials")
        if self.hv_ratio is not None:
            parts.append(f"HV ratio {self.hv_ratio:.4f}")
        parts.append(f"front {len(self.points)}")
        if self.clipped:
            parts.append(f"[dim]plot PPL<={PLOT_PPL_FACTOR:g}x (z)[/]")
        return "  ".join(parts)

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
        self.query_one(ParetoPlot).draw(front, hist, self.exact_xy if not measured else np.zeros((0, 2)), sel,
                                        label, y_max)
        self.query_one("#search-stats", Label).update(self._stats_text())
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
        line.update(Text.from_markup(self.message + "\n") + Text(point_summary(p, self.profile), style="bold"))
        blocks = self.profile.gene_blocks if self.profile.granularity != "block" else None
        strip.show(p.bits, blocks)
        self.query_one("#strip-legend", Label).update(legend(sorted(set(self.profile.bits))))
        layers = self.query_one("#layers", DataTable)
        if layers.display and self._layers_for != p.trial_number:
            self._layers_for = p.trial_number
            layers.clear()
            for i, name, block, b, params, kl in layer_rows(self.profile, p.bits):
                layers.add_row(name, Text(f" {b} ", style=bit_style(b)), f"{params:,}", f"{kl:.5f}")

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

    @on(ParetoPlot.PointClicked)
    def _plot_clicked(self, event: ParetoPlot.PointClicked) -> None:
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
            self.app.push_screen(PointScreen(self.study, p, self.profile))

    def action_archetypes(self) -> None:
        if not self.points or not archetypes_available():
            return
        if self.state == "running":
            self.notify("The archetypes use the front as it is now; the search keeps running.", timeout=4)
        from .archetypes import ArchetypesScreen

        self.app.push_screen(ArchetypesScreen(self.study, self.cfg, self.setup))

    def action_back(self) -> None:
        if self.state == "running":
            self.action_toggle()
            self.notify("Pausing the search; escape again goes back.", timeout=3)
            return
        self.app.pop_screen()

    def on_unmount(self) -> None:
        self._stop.set()


class PointScreen(Screen):
    """One front point: the strip and the per-layer table, full screen (for small terminals)."""

    TITLE_TEXT = "Point layers"
    HELP = "The bit-width of every layer of the selected point, with its predicted contribution to the loss."
    BINDINGS = [Binding("escape,enter,q", "app.pop_screen", "Back")]

    def __init__(self, study: str, point, profile) -> None:
        super().__init__()
        self.study, self.point, self.profile = study, point, profile

    def compose(self) -> ComposeResult:
        yield Header()
        yield Label(point_summary(self.point, self.profile), id="point-title")
        yield BitStrip(id="point-strip")
        yield Label(legend(sorted(set(self.profile.bits))))
        yield DataTable(id="point-layers", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"{self.study} trial {self.point.trial_number}"
        blocks = self.profile.gene_blocks if self.profile.granularity != "block" else None
        self.query_one("#point-strip", BitStrip).show(self.point.bits, blocks)
        table = self.query_one("#point-layers", DataTable)
        table.add_columns("#", "layer", "block", "bits", "params", "pred. KL (nats)")
        for i, name, block, b, params, kl in layer_rows(self.profile, self.point.bits):
            table.add_row(str(i), name, str(block), Text(f" {b} ", style=bit_style(b)), f"{params:,}", f"{kl:.5f}")
        table.focus()
