"""Archetypes: the few front points worth deploying, measured on demand, exported all at once.

Everything goes through the export job (:func:`empas_tui.jobs.export.export_job`), the one
``empas export`` runs: choosing (``write=False``) on the study's front under optional budgets,
measuring on held-out tokens (``validate=True``), and writing every artifact of one export or none.
An archetype a budget rules out is listed as skipped and the others are still exported. Baselines
(dense, uniform RTN, the Q4_K_M-style mix) are measured on the same held-out tokens
(:mod:`empas_tui.jobs.baselines`). Held-out results never change which point is chosen (that would
select on the test set); they are shown next to the prediction and written into the artifacts.
"""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Label, ProgressBar
from textual.worker import get_current_worker

from ..dialogs import BudgetPrompt, FolderPrompt
from ..format import MIB, fmt_seconds, number, one_line, percent
from ..messages import ArchetypesChosen, ExportWritten, ValidationDone, ValidationProgress
from ..widgets.bitstrip import BitStrip, QtypePalette

log = logging.getLogger(__name__)

NARROW_COLUMNS = 110


def export_format(profile) -> str:
    """What an export writes besides the artifact JSON (``ExportSettings.format``).

    The seam for the GGUF step: ggml studies will export ``"gguf"`` (and measure the files with
    llama.cpp) once the job layer writes GGUF; until then every study exports its JSON artifacts."""
    return "json"


class ArchetypesScreen(Screen):
    TITLE_TEXT = "Archetypes"
    HELP = """\
- **max-accuracy**: the front point with the lowest loss.
- **balanced**: the knee of the front (farthest from the line joining its two ends, both axes scaled).
- **max-compression**: the smallest point whose perplexity rise stays under the cap (25% unless a
  budget says otherwise).

*pred.ΔPPL* is the additive proxy's perplexity change on the calibration tokens (a prediction). **m**
measures every archetype, a few more front points and the baselines (RTN: dense, uniform 8/4/3/2-bit,
llama.cpp Q4_K_M-style mix) on held-out tokens the profile never saw: PPL, ΔPPL (change vs the dense
model on the same tokens: compare it with pred.ΔPPL), KL to dense. Memory is the memory model, not a
file size. An archetype a budget rules out is shown as *skipped*, with the reason.

| key | action |
|---|---|
| `up`/`down` | highlight an archetype (its genome appears as a strip) |
| `m` | measure on held-out tokens (in the background; `c` cancels) |
| `e` | export every chosen archetype into a folder (JSON artifacts, with the measurements if measured) |
| `b` | budgets: "best accuracy under N MiB" and/or "smallest under X% PPL rise" (re-chooses all) |
| `escape` | back to the search |
"""
    BINDINGS = [
        Binding("m", "measure", "Measure"),
        Binding("c", "cancel", "Cancel"),
        Binding("e", "export", "Export"),
        Binding("b", "budget", "Budget"),
        Binding("escape", "app.pop_screen", "Back"),
    ]
    PALETTE = [
        ("Measure archetypes", "Measure archetypes and baselines on held-out tokens", "measure"),
        ("Export archetypes", "Write the chosen archetypes as JSON artifacts into a folder", "export"),
        ("Archetype budget", "Best accuracy under N MiB / smallest under X% PPL rise", "budget"),
    ]

    def __init__(self, study: str, model: str | None = None) -> None:
        super().__init__()
        from search.export_settings import ExportSettings

        self.study = study
        self.model = model  # what to load for measuring (default: the study's model id)
        self.settings = ExportSettings(study=study, output=str(Path.cwd() / f"{study}-archetypes"))
        self.result = None  # jobs.export.ExportResult of the current choice (not written)
        self.validation = None  # the latest held-out validation of the archetypes
        self.baselines = None  # ValidationResult of the baselines
        self.baseline_rows: list = []  # their rows, as they are measured
        self.measured: dict[int, object] = {}  # trial number -> ValidationRow of that front point
        self.busy = ""  # "" | "measuring" | "exporting"
        self.written: list[Path] = []
        self._stop = threading.Event()

    @property
    def front(self):
        return self.result.front if self.result is not None else None

    @property
    def choices(self) -> list:
        return list(self.result.choices) if self.result is not None else []

    @property
    def skipped(self) -> dict[str, str]:
        return dict(self.result.skipped) if self.result is not None else {}

    def compose(self) -> ComposeResult:
        yield Header()
        yield Label("loading the front...", id="arch-info")
        yield DataTable(id="arch-table", cursor_type="row", zebra_stripes=True)
        yield Label("", id="arch-skipped")
        yield BitStrip(id="arch-strip")
        yield Label("", id="arch-legend")
        with Horizontal(id="measure-row"):
            yield ProgressBar(id="measure-bar", show_eta=False)
            yield Label("", id="measure-status")
        yield Label("Baselines, measured on held-out tokens (press m)", classes="section", id="baselines-title")
        yield DataTable(id="baselines", cursor_type="row", zebra_stripes=True)
        yield Label("", id="baseline-notes", classes="dim")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"archetypes {self.study}"
        table = self.query_one("#arch-table", DataTable)
        # Fixed widths: the header stays aligned while measured values arrive. Predicted and measured
        # PPL are on different tokens (calibration vs held-out), so the comparable numbers are the
        # changes against dense on the same tokens: pred. ΔPPL vs ΔPPL.
        for label, width in (("archetype", 15), ("trial", 5), ("MiB", 7), ("bits", 5), ("pred.ΔPPL", 9),
                             ("PPL", 7), ("ΔPPL", 8), ("KL", 6)):
            table.add_column(label, width=width)
        self.query_one("#baselines", DataTable).add_columns("baseline", "MiB", "bits", "PPL", "ΔPPL", "KL")
        self.query_one("#measure-row").display = False
        self.query_one("#arch-skipped").display = False
        self.set_class(self.size.width < NARROW_COLUMNS, "narrow")
        table.focus()
        self._choose(self.settings)

    def on_resize(self, event) -> None:
        self.set_class(event.size.width < NARROW_COLUMNS, "narrow")

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action == "cancel":
            return bool(self.busy)
        if action in ("measure", "export", "budget"):
            return False if self.busy else (bool(self.choices) or None)
        return True

    # -- choosing -----------------------------------------------------------------------------------

    def _load(self, model, model_id, fingerprint):
        """The export job's model, from the app's cache (loaded once per TUI session)."""
        return self.app.load_model(model or model_id, fingerprint)

    @work(thread=True, exclusive=True, group="arch-choose", exit_on_error=False)
    def _choose(self, settings, budget: bool = False) -> None:
        from ...jobs.export import export_job

        try:
            result = export_job(settings, self.app.db, write=False, load=self._load)
        except Exception as exc:  # ArchetypeError: nothing fits the budget; the message names what does
            if not budget:
                log.exception("choosing archetypes failed")
            self.post_message(ArchetypesChosen(settings, error=one_line(exc), budget=budget))
            return
        self.post_message(ArchetypesChosen(settings, result, budget=budget))

    def on_archetypes_chosen(self, message: ArchetypesChosen) -> None:
        if message.error:
            if message.budget:
                self.notify(message.error, title="Budget", severity="error", timeout=10)
            else:
                self.query_one("#arch-info", Label).update(f"[b red]error:[/] {message.error}")
                self.notify(message.error, severity="error")
            return
        self.result, self.settings = message.result, message.settings
        self._show_info()
        self._fill()
        self.refresh_bindings()
        if message.budget:
            self.notify(self._budget_text() or "no budget: the whole front", title="Archetypes re-chosen")

    def _show_info(self) -> None:
        p = self.front.profile
        basis = self.choices[0].basis if self.choices else "predicted"
        dense = ", the dequantised Q4_1 GGUF" if p.model_id == "default" else ""
        budget = f" Budget: {self._budget_text()}." if self._budget_text() else ""
        self.query_one("#arch-info", Label).update(
            f"{len(self.front.points)} front points of [b]{self.study}[/] ({p.model_id}, {p.granularity}, "
            f"{p.quantizer.get('name')}); chosen on {basis} loss.{budget} Dense{dense}: loss {p.base_loss:.4f} "
            f"(PPL {p.base_ppl:.2f}) on calibration tokens.")
        self.query_one("#arch-legend", Label).update(QtypePalette.of(p).legend())

    def point_of(self, choice):
        return self.front.points[choice.index]

    def _fill(self) -> None:
        table = self.query_one("#arch-table", DataTable)
        keep = table.cursor_row
        table.clear()
        p = self.front.profile
        for c in self.choices:
            pt = self.point_of(c)
            pred_rise = 100.0 * math.expm1(pt.predicted_loss - p.base_loss)
            row = self.measured.get(pt.trial_number)
            table.add_row(c.archetype, str(pt.trial_number), f"{pt.memory_bytes / MIB:.1f}",
                          f"{pt.average_bits or p.average_bits(pt.qtypes):.2f}", percent(pred_rise),
                          number(row.ppl) if row else "-", percent(row.delta_ppl_pct) if row else "-",
                          f"{row.kl:.3f}" if row else "-", key=c.archetype)
        for name in self.skipped:
            table.add_row(name, "-", "-", "-", "skipped", "-", "-", "-", key=name)
        if table.row_count:
            table.move_cursor(row=min(keep, table.row_count - 1), animate=False)
        skipped = self.query_one("#arch-skipped", Label)
        skipped.update("\n".join(f"[b]{name}[/] skipped: {why}" for name, why in self.skipped.items()))
        skipped.display = bool(self.skipped)
        base = self.query_one("#baselines", DataTable)
        base.clear()
        notes = []
        for row in self.baseline_rows:
            base.add_row(row.name, f"{row.memory_mib:.1f}", f"{row.average_bits:.2f}", number(row.ppl),
                         percent(row.delta_ppl_pct), f"{row.kl:.3f}")
            if row.note:
                notes.append(f"{row.name}: {row.note}")
        self.query_one("#baseline-notes", Label).update("\n".join(notes))
        self._show_strip()

    def highlighted(self):
        table = self.query_one("#arch-table", DataTable)
        if not self.choices or table.row_count == 0 or table.cursor_row >= len(self.choices):
            return None
        return self.choices[table.cursor_row]

    def _show_strip(self) -> None:
        c = self.highlighted()
        strip = self.query_one("#arch-strip", BitStrip)
        if c is None:
            strip.show([])
            return
        p = self.front.profile
        strip.show(self.point_of(c).qtypes, QtypePalette.of(p), p.gene_blocks if p.granularity != "block" else None)

    @on(DataTable.RowHighlighted, "#arch-table")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._show_strip()

    # -- budgets ------------------------------------------------------------------------------------

    def action_budget(self) -> None:
        if not self.choices or self.busy:
            return

        def apply(answer) -> None:
            if answer is not None:
                self._choose(self.settings.with_(max_mib=answer[0], max_ppl_rise=answer[1]), budget=True)

        self.app.push_screen(BudgetPrompt(self.settings.max_mib, self.settings.max_ppl_rise), apply)

    def _budget_text(self) -> str:
        parts = []
        if self.settings.max_mib is not None:
            parts.append(f"memory <= {self.settings.max_mib:g} MiB")
        if self.settings.max_ppl_rise is not None:
            parts.append(f"PPL rise <= {self.settings.max_ppl_rise:g}%")
        return ", ".join(parts)

    # -- measuring and exporting: the export job in a worker ------------------------------------------

    def _begin(self, what: str, status: str) -> None:
        self.busy = what
        self._stop.clear()
        self.query_one("#measure-row").display = True
        self.query_one("#measure-bar", ProgressBar).update(total=None, progress=0)
        self.query_one("#measure-status", Label).update(status)
        self.refresh_bindings()

    def _end(self, status: str) -> None:
        self.busy = ""
        self.query_one("#measure-status", Label).update(status)
        self.refresh_bindings()

    def action_measure(self) -> None:
        if self.busy or not self.choices:
            return
        self._begin("measuring", "loading the model...")
        self.baseline_rows = []
        self._measure(self.settings.with_(validate=True))

    def action_cancel(self) -> None:
        if self.busy:
            self._stop.set()
            self.query_one("#measure-status", Label).update("cancelling after the current genome...")

    def _should_stop(self, worker) -> bool:
        return self._stop.is_set() or worker.is_cancelled

    def _loaded(self):
        p = self.front.profile
        return self.app.load_model(self.model or p.model_id, p.model_fingerprint)

    @work(thread=True, exclusive=True, group="arch-measure", exit_on_error=False)
    def _measure(self, settings) -> None:
        from profiling.evaluation import ValidationCancelled

        from ...jobs.baselines import measure_baselines
        from ...jobs.export import export_job

        worker = get_current_worker()
        post = self.post_message
        try:
            loaded = self._loaded()
            post(ValidationProgress(status=f"dense reference on {settings.heldout_tokens} held-out tokens..."))
            result = export_job(settings, self.app.db, load=self._load, progress=lambda e: post(ValidationProgress(e, "archetypes")),
                                should_stop=lambda: self._should_stop(worker), loaded=loaded, write=False)
            post(ValidationProgress(status="baselines: dense reference..."))
            baselines = measure_baselines(settings, result.front, loaded,
                                          progress=lambda e: post(ValidationProgress(e, "baselines")),
                                          should_stop=lambda: self._should_stop(worker))
        except ValidationCancelled:
            post(ValidationDone(cancelled=True))
            return
        except Exception as exc:
            log.exception("validation failed")
            post(ValidationDone(error=one_line(exc)))
            return
        post(ValidationDone(result, baselines))

    def on_validation_progress(self, message: ValidationProgress) -> None:
        status = self.query_one("#measure-status", Label)
        if message.event is None:
            status.update(message.status)
            return
        e = message.event
        self.query_one("#measure-bar", ProgressBar).update(total=max(e.total, 1), progress=e.done)
        if e.row is not None and message.phase == "archetypes" and "trial" in e.row.source:
            self.measured[int(e.row.source["trial"])] = e.row
            self._fill()
        elif e.row is not None and message.phase == "baselines":
            self.baseline_rows.append(e.row)
            self._fill()
        eta = f", ETA {fmt_seconds(e.eta_seconds)}" if e.eta_seconds else ""
        status.update(f"{message.phase} {e.done}/{e.total} measured{eta}")

    def on_validation_done(self, message: ValidationDone) -> None:
        if message.cancelled or message.error:
            self._end("cancelled" if message.cancelled else f"[b red]{message.error}[/]")
            if message.error:
                self.notify(message.error, title="Measuring failed", severity="error", timeout=10)
            return
        self.result, self.validation, self.baselines = message.result, message.result.validation, message.baselines
        self.baseline_rows = list(message.baselines.rows) if message.baselines is not None else []
        r = self.validation
        fid = r.fidelity
        extra = (f"; proxy vs measured: Spearman {fid['spearman']:.2f}" if fid and fid.get("spearman") is not None
                 and math.isfinite(fid["spearman"]) else "")
        from ...jobs.baselines import baselines_available

        pending = baselines_available(self.front)
        self.query_one("#baselines-title", Label).update(pending or "Baselines, measured on the same held-out tokens")
        self._end(f"measured on {r.heldout_tokens} held-out tokens ({r.tokens_source}); dense PPL {r.dense_ppl:.2f}"
                  f"{extra}")
        self.notify("Archetypes and baselines measured.", title="Held-out validation")
        self._fill()

    def action_export(self) -> None:
        if self.busy or not self.choices:
            return
        n = len(self.choices)
        what = ("with their held-out measurements (measured again while writing)" if self.validation is not None
                else "predicted metrics only (press m first to include held-out measurements)")
        skipped = f"; skipped: {', '.join(self.skipped)}" if self.skipped else ""

        def write(folder: Path | None) -> None:
            if folder is not None:
                settings = self.settings.with_(output=str(folder), validate=self.validation is not None,
                                               format=export_format(self.front.profile))
                self._begin("exporting", "exporting...")
                self._export(settings)

        self.app.push_screen(FolderPrompt(f"Export {n} archetype(s) into the folder", self.settings.output,
                                          note=f"{what}{skipped}. All files are written, or none."), write)

    @work(thread=True, exclusive=True, group="arch-export", exit_on_error=False)
    def _export(self, settings) -> None:
        from ...jobs.export import export_job

        worker = get_current_worker()
        post = self.post_message
        try:
            loaded = self._loaded() if settings.validate else None
            result = export_job(settings, self.app.db, load=self._load, progress=lambda e: post(ValidationProgress(e, "export")),
                                should_stop=lambda: self._should_stop(worker), loaded=loaded, write=True)
        except Exception as exc:
            log.exception("export failed")
            post(ExportWritten(error=one_line(exc)))
            return
        post(ExportWritten(result))

    def on_export_written(self, message: ExportWritten) -> None:
        if message.error:
            self._end(f"[b red]export failed, nothing written:[/] {message.error}")
            self.notify(message.error, title="Export", severity="error", timeout=10)
            return
        r = message.result
        self.written = list(r.paths)
        folder = Path(r.paths[0]).parent if r.paths else Path(self.settings.output)
        skipped = f" ({', '.join(r.skipped)} skipped)" if r.skipped else ""
        self._end(f"wrote {len(r.artifacts)} artifact(s){skipped} to {folder}")
        self.notify(f"wrote {len(r.paths)} file(s) to {folder}{skipped}", title="Exported", timeout=8)
