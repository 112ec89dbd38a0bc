"""Archetypes: the few front points worth deploying, measured on demand, exported all at once.

Everything goes through the export job (:func:`empas_tui.jobs.export.export_job`), the one
``empas export`` runs: choosing (``write=False``) on the study's front under optional budgets,
measuring on held-out tokens (``validate=True``), and writing every artifact of one export or none.
An archetype a budget rules out is listed as skipped and the others are still exported. Baselines
(RTN: dense, uniform RTN, the Q4_K_M-style mix; ggml: llama.cpp's presets, with their exact GGUF file
size and the profile's prediction) are measured on the same held-out tokens
(:mod:`empas_tui.jobs.baselines`). A ggml study exports GGUF files, which ``g`` measures in llama.cpp
(:func:`empas_tui.jobs.run.measure_in_llamacpp`, the job ``empas evaluate --engine llamacpp`` runs). Held-out results never change which point is chosen (that would
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
from ..messages import (ArchetypesChosen, ExportWritten, LlamaCppDone, LlamaCppProgress, ValidationDone,
                        ValidationProgress)
from ..widgets.bitstrip import BitStrip, QtypePalette

log = logging.getLogger(__name__)

NARROW_COLUMNS = 110


def export_format(profile) -> str:
    """What an export writes besides the artifact JSON (``ExportSettings.format``): GGUF files for a
    ggml study whose memory objective is the GGUF file (what llama.cpp runs), else JSON only."""
    ggml = profile.quantizer.get("name") == "ggml" and profile.memory_basis == "gguf file"
    return "gguf" if ggml else "json"


def is_ggml(profile) -> bool:
    return profile.quantizer.get("name") == "ggml"


class ArchetypesScreen(Screen):
    TITLE_TEXT = "Archetypes"
    HELP = """\
- **max-accuracy**: the front point with the lowest loss.
- **balanced**: the knee of the front (farthest from the line joining its two ends, both axes scaled).
- **max-compression**: the smallest point whose perplexity rise stays under the cap (25% unless a
  budget says otherwise).

*pred.ΔPPL* is the additive proxy's perplexity change on the calibration tokens (a prediction). **m**
measures every archetype, a few more front points and the baselines on held-out tokens the profile
never saw, in PyTorch: PPL, ΔPPL (change vs the dense model on the same tokens: compare it with
pred.ΔPPL), KL to dense. Baselines: RTN studies dense, uniform 8/4/3/2-bit and a llama.cpp
Q4_K_M-style mix (memory = the memory model); ggml studies llama.cpp's presets Q8_0 ... Q2_K, Q4_0,
with their exact GGUF file **MB** (10^6 bytes) and *pred.KL* from the profile (n/a where the genes
cannot express the preset, e.g. Q4_K_M at block genes). A ggml study exports GGUF files; after the
export **g** measures them and the presets in llama.cpp: PPL, ΔPPL and KL to the F16 file, and
generation tokens/s on this machine. An archetype a budget rules out is shown as *skipped*.

| key | action |
|---|---|
| `up`/`down` | highlight an archetype (its genome appears as a strip) |
| `m` | measure on held-out tokens (in the background; `c` cancels) |
| `e` | export every chosen archetype into a folder (JSON artifacts; GGUF files for a ggml study) |
| `g` | measure the exported GGUF files and the presets in llama.cpp (in the background; `c` cancels) |
| `b` | budgets: "best accuracy under N MiB" and/or "smallest under X% PPL rise" (re-chooses all) |
| `escape` | back to the search |
"""
    BINDINGS = [
        Binding("m", "measure", "Measure"),
        Binding("c", "cancel", "Cancel"),
        Binding("e", "export", "Export"),
        Binding("g", "llamacpp", "llama.cpp"),
        Binding("b", "budget", "Budget"),
        Binding("escape", "app.pop_screen", "Back"),
    ]
    PALETTE = [
        ("Measure archetypes", "Measure archetypes and baselines on held-out tokens", "measure"),
        ("Export archetypes", "Write the chosen archetypes (JSON artifacts, GGUF for ggml) into a folder", "export"),
        ("Measure in llama.cpp", "Held-out PPL, KL to F16 and tokens/s of the exported GGUFs and presets",
         "llamacpp"),
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
        self.busy = ""  # "" | "measuring" | "exporting" | "llama.cpp"
        self.written: list[Path] = []
        self.presets: list = []  # ggml: jobs.baselines.PresetBaseline, smallest file first
        self.presets_error = ""
        self.gguf_paths: dict[str, Path] = {}  # archetype -> the GGUF the last export wrote
        self.llamacpp = None  # jobs.run.LlamaCppRun of those files and the presets
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
        yield Label("", id="near-presets")
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
        self.query_one("#measure-row").display = False
        self.query_one("#near-presets").display = False
        self.query_one("#arch-skipped").display = False
        self.set_class(self.size.width < NARROW_COLUMNS, "narrow")
        table.focus()
        self._choose(self.settings)

    def on_resize(self, event) -> None:
        self.set_class(event.size.width < NARROW_COLUMNS, "narrow")

    def _columns(self, ggml: bool) -> None:
        """The tables' columns: a ggml study shows file MB (exact) and measured tokens/s; RTN the memory
        model's MiB and the trial. Fixed widths: the header stays aligned while values arrive."""
        table = self.query_one("#arch-table", DataTable)
        base = self.query_one("#baselines", DataTable)
        if table.columns:
            return
        # Predicted and measured PPL are on different tokens (calibration vs held-out), so the comparable
        # numbers are the changes against dense on the same tokens: pred. ΔPPL vs ΔPPL.
        if ggml:
            arch = (("archetype", 15), ("MB", 7), ("bits", 5), ("pred.ΔPPL", 9), ("PPL", 7), ("ΔPPL", 8),
                    ("KL", 6), ("tok/s", 6))
            base.add_columns("preset", "MB", "bits", "pred.KL", "PPL", "ΔPPL", "KL", "tok/s")
        else:
            arch = (("archetype", 15), ("trial", 5), ("MiB", 7), ("bits", 5), ("pred.ΔPPL", 9), ("PPL", 7),
                    ("ΔPPL", 8), ("KL", 6))
            base.add_columns("baseline", "MiB", "bits", "PPL", "ΔPPL", "KL")
        for label, width in arch:
            table.add_column(label, width=width)

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action == "cancel":
            return bool(self.busy)
        if action in ("measure", "export", "budget"):
            return False if self.busy else (bool(self.choices) or None)
        if action == "llamacpp":
            if self.front is None or not is_ggml(self.front.profile):
                return None  # hidden: an RTN study has no GGUF
            return not self.busy and bool(self.gguf_paths)
        return True

    # -- choosing -----------------------------------------------------------------------------------

    def _load(self, model, model_id, fingerprint):
        """The export job's model, from the app's cache (loaded once per TUI session)."""
        return self.app.load_model(model or model_id, fingerprint)

    @work(thread=True, exclusive=True, group="arch-choose", exit_on_error=False)
    def _choose(self, settings, budget: bool = False) -> None:
        from ...jobs.export import export_job

        try:
            result = export_job(settings, self.app.db, write=False, load=self._load,
                                progress=lambda e: self.post_message(ValidationProgress(e, "refining")))
        except Exception as exc:  # ArchetypeError: nothing fits the budget; the message names what does
            if not budget:
                log.exception("choosing archetypes failed")
            self.post_message(ArchetypesChosen(settings, error=one_line(exc), budget=budget))
            return
        presets, presets_error = None, ""
        if is_ggml(result.front.profile) and not self.presets:
            from ...jobs.baselines import ggml_presets

            try:
                presets = sorted(ggml_presets(result.front, result.study), key=lambda p: p.file_bytes)
            except Exception as exc:  # a model with no GGUF layout: say so, keep the archetypes
                log.exception("llama.cpp presets failed")
                presets_error = one_line(exc)
        self.post_message(ArchetypesChosen(settings, result, budget=budget, presets=presets,
                                           presets_error=presets_error))

    def on_archetypes_chosen(self, message: ArchetypesChosen) -> None:
        if message.error:
            if message.budget:
                self.notify(message.error, title="Budget", severity="error", timeout=10)
            else:
                self.query_one("#arch-info", Label).update(f"[b red]error:[/] {message.error}")
                self.notify(message.error, severity="error")
            return
        self.result, self.settings = message.result, message.settings
        if message.presets is not None:
            self.presets = message.presets
        if message.presets_error:
            self.presets_error = message.presets_error
        if message.budget:  # other choices: the files written for the earlier ones are not theirs
            self.gguf_paths, self.llamacpp = {}, None
        self._columns(is_ggml(self.front.profile))
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

    def llamacpp_numbers(self, path) -> tuple[float, float, float, float] | None:
        """(PPL, ΔPPL % vs the F16 file, KL to F16, generation tokens/s) llama.cpp measured for a file."""
        run = self.llamacpp
        if run is None or path is None:
            return None
        rows = {r.path: r for r in run.evaluation.rows}
        row, f16 = rows.get(str(path)), next((r for r in run.evaluation.rows if r.name == "F16"), None)
        if row is None:
            return None
        rise = 100.0 * (row.llamacpp_ppl / f16.llamacpp_ppl - 1.0) if f16 is not None else float("nan")
        return row.llamacpp_ppl, rise, row.llamacpp_kl, run.generation_tokens_per_s.get(str(path), float("nan"))

    def preset_path(self, name: str):
        run = self.llamacpp
        if run is None:
            return None
        return next((r.path for r in run.evaluation.rows if r.name == name), None)

    def _fill(self) -> None:
        table = self.query_one("#arch-table", DataTable)
        keep = table.cursor_row
        table.clear()
        p = self.front.profile
        ggml = is_ggml(p)
        for c in self.choices:
            pt = self.point_of(c)
            pred_rise = 100.0 * math.expm1(pt.predicted_loss - p.base_loss)
            row = self.measured.get(pt.trial_number)
            bits = f"{pt.average_bits or p.average_bits(pt.qtypes):.2f}"
            measured = (number(row.ppl), percent(row.delta_ppl_pct), f"{row.kl:.3f}") if row else ("-", "-", "-")
            if ggml:
                speed = "-"
                llama = self.llamacpp_numbers(self.gguf_paths.get(c.archetype))
                if llama is not None:  # llama.cpp's own numbers on the file, once measured
                    measured = (number(llama[0]), percent(llama[1]), f"{llama[2]:.3f}")
                    speed = f"{llama[3]:.0f}" if math.isfinite(llama[3]) else "-"
                table.add_row(c.archetype, f"{pt.memory_bytes / 1e6:.2f}", bits, percent(pred_rise), *measured,
                              speed, key=c.archetype)
            else:
                table.add_row(c.archetype, str(pt.trial_number), f"{pt.memory_bytes / MIB:.1f}", bits,
                              percent(pred_rise), *measured, key=c.archetype)
        for name in self.skipped:
            cells = ("-", "-", "skipped", "-", "-", "-", "-") if ggml else ("-", "-", "-", "skipped", "-", "-", "-")
            table.add_row(name, *cells, key=name)
        if table.row_count:
            table.move_cursor(row=min(keep, table.row_count - 1), animate=False)
        skipped = self.query_one("#arch-skipped", Label)
        skipped.update("\n".join(f"[b]{name}[/] skipped: {why}" for name, why in self.skipped.items()))
        skipped.display = bool(self.skipped)
        base = self.query_one("#baselines", DataTable)
        base.clear()
        notes = []
        if ggml:
            self._fill_presets(base, notes)
        else:
            for row in self.baseline_rows:
                base.add_row(row.name, f"{row.memory_mib:.1f}", f"{row.average_bits:.2f}", number(row.ppl),
                             percent(row.delta_ppl_pct), f"{row.kl:.3f}")
                if row.note:
                    notes.append(f"{row.name}: {row.note}")
        self.query_one("#baseline-notes", Label).update("\n".join(notes))
        self._show_strip()

    def _fill_presets(self, base: DataTable, notes: list[str]) -> None:
        """llama.cpp's presets: exact file MB and the profile's prediction, then what was measured
        (llama.cpp once `g` ran, else PyTorch on held-out tokens once `m` ran)."""
        from ...jobs.baselines import preset_kl_text

        p = self.front.profile
        torch_rows = {r.name: r for r in self.baseline_rows}
        for preset in self.presets:
            measured, speed = ("-", "-", "-"), "-"
            llama = self.llamacpp_numbers(self.preset_path(preset.name))
            if llama is not None:
                measured = (number(llama[0]), percent(llama[1]), f"{llama[2]:.3f}")
                speed = f"{llama[3]:.0f}" if math.isfinite(llama[3]) else "-"
            elif preset.name in torch_rows:
                r = torch_rows[preset.name]
                measured = (number(r.ppl), percent(r.delta_ppl_pct), f"{r.kl:.3f}")
            base.add_row(preset.name, f"{preset.file_mb:.2f}", f"{preset.average_bits:.2f}",
                         preset_kl_text(preset, p.base_loss), *measured, speed, key=preset.name)
        unpredicted = [pr for pr in self.presets if pr.predicted_loss is None]
        if unpredicted:
            notes.append(f"pred.KL n/a for {', '.join(pr.name for pr in unpredicted)}: {unpredicted[0].why_not}")
        if self.presets_error:
            notes.append(f"presets: {self.presets_error}")
        self.query_one("#baselines-title", Label).update(self._presets_title())

    def _presets_title(self) -> str:
        if self.llamacpp is not None:
            r = self.llamacpp.evaluation
            return (f"llama.cpp's presets and the exported files, measured in llama.cpp ({r.heldout_tokens} held-out "
                    f"tokens, KL to F16, {self.llamacpp.n_threads} thread(s) on {r.hardware})")
        if self.baseline_rows:
            return "llama.cpp's presets (MB exact, pred. = profile), measured in PyTorch on held-out tokens"
        return "llama.cpp's presets (file MB exact, pred.KL from the profile); m or g measures them"

    def _show_near_presets(self) -> None:
        """The highlighted archetype's file size beside the presets nearest to it."""
        label = self.query_one("#near-presets", Label)
        c = self.highlighted()
        label.display = bool(self.presets) and c is not None
        if not label.display:
            return
        from ...jobs.baselines import nearest_presets, preset_kl_text

        p = self.front.profile
        pt = self.point_of(c)
        near = ", ".join(f"{pr.name} {pr.file_mb:.2f} MB (pred.KL {preset_kl_text(pr, p.base_loss)})"
                         for pr in nearest_presets(pt.memory_bytes, self.presets))
        label.update(f"[b]{c.archetype}[/] (trial {pt.trial_number}) {pt.memory_bytes / 1e6:.2f} MB, pred.KL "
                     f"{pt.predicted_loss - p.base_loss:.3f}; nearest presets: {near}")

    def highlighted(self):
        table = self.query_one("#arch-table", DataTable)
        if not self.choices or table.row_count == 0 or table.cursor_row >= len(self.choices):
            return None
        return self.choices[table.cursor_row]

    def _show_strip(self) -> None:
        self._show_near_presets()
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
        if not is_ggml(self.front.profile):
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
        if export_format(self.front.profile) == "gguf":
            what = f"GGUF files (llama.cpp runs them; g measures them) and artifacts, {what}"
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
        self.gguf_paths = {c.archetype: Path(p) for c in r.choices for p in r.paths
                           if Path(p).name == f"{c.archetype}.gguf"}
        self.llamacpp = None  # new files: what was measured was the earlier ones
        if self.gguf_paths:
            sizes = ", ".join(f"{a} {p.stat().st_size / 1e6:.2f} MB" for a, p in self.gguf_paths.items())
            self._end(f"wrote {len(self.gguf_paths)} GGUF file(s) ({sizes}){skipped} to {folder}; g measures them "
                      f"in llama.cpp")
        else:
            self._end(f"wrote {len(r.artifacts)} artifact(s){skipped} to {folder}")
        self.notify(f"wrote {len(r.paths)} file(s) to {folder}{skipped}", title="Exported", timeout=8)
        self._fill()

    # -- llama.cpp: the exported files and the presets, in a worker ------------------------------------

    def action_llamacpp(self) -> None:
        if self.busy or not self.gguf_paths:
            return
        self._begin("llama.cpp", "llama.cpp: writing the F16 reference and the presets (once per model)...")
        self._llamacpp(list(self.gguf_paths.values()))

    @work(thread=True, exclusive=True, group="arch-llamacpp", exit_on_error=False)
    def _llamacpp(self, files: list[Path]) -> None:
        from ...jobs.run import RunCancelled, measure_in_llamacpp

        worker = get_current_worker()
        post = self.post_message
        try:
            run = measure_in_llamacpp(files, self._loaded(), heldout_tokens=self.settings.heldout_tokens,
                                      seq_len=self.settings.seq_len, text_file=self.settings.text_file,
                                      progress=lambda done, total, name: post(LlamaCppProgress(done, total, name)),
                                      should_stop=lambda: self._should_stop(worker))
        except RunCancelled:
            post(LlamaCppDone(cancelled=True))
            return
        except Exception as exc:
            log.exception("llama.cpp measurement failed")
            post(LlamaCppDone(error=one_line(exc)))
            return
        post(LlamaCppDone(run))

    def on_llama_cpp_progress(self, message: LlamaCppProgress) -> None:
        self.query_one("#measure-bar", ProgressBar).update(total=max(message.total, 1), progress=message.done)
        if message.name:
            self.query_one("#measure-status", Label).update(f"llama.cpp {message.done}/{message.total}: {message.name}")

    def on_llama_cpp_done(self, message: LlamaCppDone) -> None:
        if message.cancelled or message.error:
            self._end("cancelled" if message.cancelled else f"[b red]llama.cpp: {message.error}[/]")
            if message.error:
                self.notify(message.error, title="llama.cpp", severity="error", timeout=10)
            return
        self.llamacpp = message.run
        r = message.run.evaluation
        self._end(f"measured in llama.cpp: {len(r.rows)} files on {r.heldout_tokens} held-out tokens; "
                  f"F16 PPL {r.rows[0].llamacpp_ppl:.2f}")
        self.notify("Exported files and presets measured in llama.cpp.", title="llama.cpp")
        self._fill()
