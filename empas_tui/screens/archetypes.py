"""Archetypes: the few front points worth deploying, measured on demand, exported as JSON.

Selection is ``search.archetypes.select_archetypes`` over the study's front (on the basis the study
searched: predicted loss, or measured loss in measured mode). Measuring is
``profiling.validation``: every archetype and the baselines (dense, uniform RTN, the Q4_K_M-style mix)
on held-out tokens, in a worker, one row at a time. Held-out results never change which point is
chosen (that would select on the test set); they are shown next to the prediction and written into
the exported artifact.
"""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Label, ProgressBar
from textual.worker import get_current_worker

from ..widgets.bitstrip import BitStrip, legend
from .profile import fmt_seconds
from .state import RunConfig, one_line

log = logging.getLogger(__name__)

MIB = 1024 * 1024
DEFAULT_HELDOUT_TOKENS = 512
DEFAULT_SEQ_LEN = 128


def _num(x) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.2f}" if abs(x) < 1e4 else f"{x:.3g}"


def _pct(x) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:+.1f}%" if abs(x) < 1e5 else f"{x:+.3g}%"


class ArchetypesScreen(Screen):
    TITLE_TEXT = "Archetypes"
    HELP = """\
- **max-accuracy**: the front point with the lowest loss.
- **balanced**: the knee of the front (farthest from the line joining its two ends, both axes scaled).
- **max-compression**: the smallest point whose perplexity rise stays under 25%.

*pred.ΔPPL* is the additive proxy's perplexity change on the calibration tokens (a prediction). **m**
measures every
archetype and the baselines (dense, uniform 8/4/3/2-bit RTN, llama.cpp Q4_K_M-style mix) on held-out
tokens the profile never saw: PPL, ΔPPL (change vs the dense model on the same tokens: compare it with
pred.ΔPPL), KL to dense. Memory is the memory model
(bit-packed codes + fp16 scale and zero per group), not a file size.

| key | action |
|---|---|
| `up`/`down` | highlight an archetype (its layers appear as a strip) |
| `m` | measure on held-out tokens (in the background; `c` cancels) |
| `e` | export the highlighted archetype to a JSON file (asks for the path) |
| `b` | budgets: "best accuracy under N MiB" and/or "smallest under X% PPL rise" (re-chooses all three) |
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
        ("Export archetype", "Write the highlighted archetype as a JSON artifact", "export"),
        ("Archetype budget", "Best accuracy under N MiB / smallest under X% PPL rise", "budget"),
    ]

    class Loaded(Message):
        def __init__(self, front=None, choices=None, error: str = "") -> None:
            super().__init__()
            self.front, self.choices, self.error = front, choices, error

    class Measured(Message):
        def __init__(self, event=None, result=None, error: str = "", status: str = "") -> None:
            super().__init__()
            self.event, self.result, self.error, self.status = event, result, error, status

    def __init__(self, study: str, cfg: RunConfig | None = None, setup=None) -> None:
        super().__init__()
        self.study, self.cfg, self.setup = study, cfg, setup
        self.front = None
        self.choices: list = []
        self.baselines: dict[str, object] = {}  # baseline name -> ValidationRow
        self.measured: dict[int, object] = {}  # trial number -> ValidationRow of that front point
        self.max_mib: float | None = None  # optional budgets ("best under N MiB", "smallest under X%")
        self.max_rise_pct: float | None = None
        self.result = None
        self.measuring = False
        self._stop = threading.Event()

    def compose(self) -> ComposeResult:
        yield Header()
        yield Label("loading the front...", id="arch-info")
        yield DataTable(id="arch-table", cursor_type="row", zebra_stripes=True)
        yield BitStrip(id="arch-strip")
        yield Label("", id="arch-legend")
        with Horizontal(id="measure-row"):
            yield ProgressBar(id="measure-bar", show_eta=False)
            yield Label("", id="measure-status")
        yield Label("Baselines, measured on held-out tokens (press m)", classes="section")
        yield DataTable(id="baselines", cursor_type="row", zebra_stripes=True)
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
        self.query_one("#baselines", DataTable).add_columns("baseline", "MiB", "bits", "PPL", "ΔPPL", "KL",
                                                            "note")
        self.query_one("#measure-row").display = False
        self.query_one("#arch-table", DataTable).focus()
        self._load(self.app.storage_url, self.study)

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action == "cancel":
            return self.measuring
        if action == "measure":
            return False if self.measuring else (bool(self.choices) or None)
        if action in ("export", "budget"):
            return bool(self.choices) or None
        return True

    # -- loading and selecting ----------------------------------------------------------------------

    @work(thread=True, exclusive=True, group="arch-load", exit_on_error=False)
    def _load(self, url: str, study: str) -> None:
        from search.study import load_front

        try:
            front = load_front(url, study)
            if not front.points:
                raise ValueError(f"study {study!r} has no front yet: run the search first")
        except Exception as exc:
            log.exception("loading the front failed")
            self.post_message(self.Loaded(error=one_line(exc)))
            return
        self.post_message(self.Loaded(front))

    def select(self, max_mib: float | None = None, max_rise_pct: float | None = None) -> str:
        """(Re)choose the archetypes under optional budgets; '' or the engine's one-line refusal."""
        from search.archetypes import front_arrays, select_archetypes

        base = self.front.profile.base_loss
        memory, predicted, measured = front_arrays(self.front.points, base)
        try:
            choices = select_archetypes(memory, predicted, base, measured_loss=measured,
                                        max_bytes=None if max_mib is None else max_mib * MIB,
                                        max_ppl_rise=None if max_rise_pct is None else max_rise_pct / 100.0)
        except ValueError as exc:  # ArchetypeError: nothing fits; the message names what is achievable
            return one_line(exc)
        self.choices, self.max_mib, self.max_rise_pct = choices, max_mib, max_rise_pct
        return ""

    def on_archetypes_screen_loaded(self, message: Loaded) -> None:
        info = self.query_one("#arch-info", Label)
        if message.error:
            info.update(f"[b red]error:[/] {message.error}")
            self.notify(message.error, severity="error")
            return
        self.front = message.front
        error = self.select()
        if error:
            info.update(f"[b red]error:[/] {error}")
            return
        p = self.front.profile
        self._show_info()
        self.query_one("#arch-legend", Label).update(legend(sorted(set(p.bits))))
        self._fill()
        self.refresh_bindings()

    def _show_info(self) -> None:
        p = self.front.profile
        basis = self.choices[0].basis if self.choices else "predicted"
        dense = ", the dequantised Q4_1 GGUF" if p.model_id == "default" else ""
        budget = f" Budget: {self._budget_text()} (b)." if self._budget_text() else ""
        self.query_one("#arch-info", Label).update(
            f"{len(self.front.points)} front points of [b]{self.study}[/] ({p.model_id}, {p.granularity}); "
            f"chosen on {basis} loss.{budget} Dense{dense}: loss {p.base_loss:.4f} (PPL {p.base_ppl:.2f}) "
            f"measured on calibration tokens.")

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
                          f"{pt.average_bits or p.average_bits(pt.bits):.2f}", _pct(pred_rise),
                          _num(row.ppl) if row else "-", _pct(row.delta_ppl_pct) if row else "-",
                          f"{row.kl:.3f}" if row else "-", key=c.archetype)
        if table.row_count:
            table.move_cursor(row=min(keep, table.row_count - 1), animate=False)
        base = self.query_one("#baselines", DataTable)
        base.clear()
        for name, row in self.baselines.items():
            base.add_row(name, f"{row.memory_mib:.1f}", f"{row.average_bits:.2f}", _num(row.ppl),
                             _pct(row.delta_ppl_pct), f"{row.kl:.3f}", row.note[:80])
        self._show_strip()

    def highlighted(self):
        table = self.query_one("#arch-table", DataTable)
        if not self.choices or table.row_count == 0:
            return None
        return self.choices[min(table.cursor_row, len(self.choices) - 1)]

    def _show_strip(self) -> None:
        c = self.highlighted()
        strip = self.query_one("#arch-strip", BitStrip)
        if c is None:
            strip.show([])
            return
        p = self.front.profile
        strip.show(self.point_of(c).bits, p.gene_blocks if p.granularity != "block" else None)

    @on(DataTable.RowHighlighted, "#arch-table")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._show_strip()

    # -- measuring ------------------------------------------------------------------------------------

    def action_measure(self) -> None:
        if self.measuring or not self.choices:
            return
        self.measuring = True
        self._stop.clear()
        self.query_one("#measure-row").display = True
        self.query_one("#measure-status", Label).update("loading the model...")
        self.refresh_bindings()
        tokens = self.cfg.heldout_tokens if self.cfg else DEFAULT_HELDOUT_TOKENS
        seq_len = self.cfg.seq_len if self.cfg else DEFAULT_SEQ_LEN
        model = self.cfg.model if self.cfg else self.front.profile.model_id
        self._measure(model, tokens, seq_len)

    def action_cancel(self) -> None:
        if self.measuring:
            self._stop.set()
            self.query_one("#measure-status", Label).update("cancelling after the current genome...")

    @work(thread=True, exclusive=True, group="arch-measure", exit_on_error=False)
    def _measure(self, model: str, n_tokens: int, seq_len: int) -> None:
        from profiling.validation import baseline_genomes, genome_from_genes, prepare_validation

        worker = get_current_worker()
        post = self.post_message
        profile = self.front.profile
        try:
            loaded = self.app.load_model(model)
            if loaded.fingerprint != profile.model_fingerprint:
                raise ValueError(f"the loaded model {loaded.model_id} has other weights than the study's "
                                 f"({profile.model_id}): start the TUI with that model")
            post(self.Measured(status="cutting held-out tokens..."))
            vs = prepare_validation(loaded, profile.quantizer, n_tokens, seq_len, None,
                                    {"corpus": profile.corpus_source, "tokens": profile.calibration_tokens})
            inv = vs.inventory(profile.granularity)
            genomes, seen = [], set()
            for c in self.choices:
                pt = self.point_of(c)
                if pt.trial_number in seen:
                    continue
                seen.add(pt.trial_number)
                names = [x.archetype for x in self.choices if self.point_of(x).trial_number == pt.trial_number]
                genomes.append(genome_from_genes(inv, pt.bits, "+".join(names), kind="archetype",
                                                 predicted_loss=pt.predicted_loss,
                                                 predicted_base_loss=profile.base_loss,
                                                 source={"trial": pt.trial_number}))
            genomes += baseline_genomes(inv, _baselines_for(inv))
            post(self.Measured(status=f"dense reference on {vs.heldout.numel()} held-out tokens..."))
            result = vs.run(genomes, progress=lambda e: post(self.Measured(event=e)),
                            should_stop=lambda: self._stop.is_set() or worker.is_cancelled)
        except Exception as exc:
            if type(exc).__name__ != "ValidationCancelled":
                log.exception("validation failed")
            post(self.Measured(error=one_line(exc) if type(exc).__name__ != "ValidationCancelled" else "cancelled"))
            return
        post(self.Measured(result=result))

    def on_archetypes_screen_measured(self, message: Measured) -> None:
        status = self.query_one("#measure-status", Label)
        bar = self.query_one("#measure-bar", ProgressBar)
        if message.status:
            status.update(message.status)
            return
        if message.event is not None:
            e = message.event
            bar.update(total=max(e.total, 1), progress=e.done)
            if e.row is not None:
                if e.row.kind == "baseline":
                    self.baselines[e.row.name] = e.row
                else:
                    self.measured[int(e.row.source["trial"])] = e.row
                self._fill()
            status.update(f"{e.done}/{e.total} measured" + (f", ETA {fmt_seconds(e.eta_seconds)}"
                                                             if e.eta_seconds else ""))
            return
        self.measuring = False
        self.refresh_bindings()
        if message.error:
            status.update(f"[b red]{message.error}[/]" if message.error != "cancelled" else "cancelled")
            if message.error != "cancelled":
                self.notify(message.error, title="Measuring failed", severity="error", timeout=10)
            return
        self.result = message.result
        r = self.result
        fid = r.fidelity
        extra = (f"; proxy vs measured: Spearman {fid['spearman']:.2f}" if fid and fid.get("spearman") is not None
                 and math.isfinite(fid["spearman"]) else "")
        status.update(f"measured on {r.heldout_tokens} held-out tokens ({r.tokens_source}); "
                      f"dense PPL {r.dense_ppl:.2f}{extra}")
        self.notify("Archetypes and baselines measured.", title="Held-out validation")
        self._fill()

    # -- budgets --------------------------------------------------------------------------------------

    def action_budget(self) -> None:
        if not self.choices:
            return
        from .dialogs import BudgetPrompt

        def apply(answer) -> None:
            if answer is None:
                return
            error = self.select(*answer)
            if error:
                self.notify(error, title="Budget", severity="error", timeout=10)
                return
            self._fill()
            self._show_info()
            self.notify(self._budget_text() or "no budget: the whole front", title="Archetypes re-chosen")

        self.app.push_screen(BudgetPrompt(self.max_mib, self.max_rise_pct), apply)

    def _budget_text(self) -> str:
        parts = []
        if self.max_mib is not None:
            parts.append(f"memory <= {self.max_mib:g} MiB")
        if self.max_rise_pct is not None:
            parts.append(f"PPL rise <= {self.max_rise_pct:g}%")
        return ", ".join(parts)

    # -- export ---------------------------------------------------------------------------------------

    def action_export(self) -> None:
        c = self.highlighted()
        if c is None:
            return
        from .dialogs import PathPrompt

        default = str(Path.cwd() / f"{self.study}-{c.archetype}.json")

        def write(path: Path | None) -> None:
            if path is not None:
                self.export(c, path)

        self.app.push_screen(PathPrompt(f"Export {c.archetype} (trial {self.point_of(c).trial_number}) to",
                                        default), write)

    def export(self, choice, path: Path) -> Path | None:
        """Write one artifact (atomically); measured numbers are included when they exist."""
        from profiling.validation import measured_metrics
        from search.archetypes import make_artifact
        from storage.artifacts import save_artifact
        from storage.urls import redact

        try:
            row = self.measured.get(self.point_of(choice).trial_number)
            heldout = measured_metrics(row, self.result) if row is not None and self.result is not None else None
            artifact = make_artifact(choice, self.point_of(choice), self.front.profile,
                                     {"study": self.study, "storage": redact(self.app.storage_url)}, heldout)
            written = save_artifact(artifact, path)
        except Exception as exc:
            log.exception("export failed")
            self.notify(f"could not write {path}: {one_line(exc)}", title="Export", severity="error", timeout=10)
            return None
        what = "with held-out measurements" if heldout else "predicted metrics only (press m to measure)"
        self.notify(f"wrote {written} ({what})", title="Exported", timeout=8)
        return Path(written)


def _baselines_for(inv) -> list[str]:
    """All baselines; the Q4_K_M-style mix only where the architecture has v_proj/down_proj layers."""
    from profiling.validation import BASELINES, q4_k_m_genome

    names = list(BASELINES)
    try:
        q4_k_m_genome(inv)
    except ValueError:
        names.remove("q4_k_m-mix")
    return names
