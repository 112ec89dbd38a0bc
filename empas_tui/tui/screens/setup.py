"""Setup: model, quantiser and its types, genes, metric, calibration, device and search size.

The form holds the fields of :class:`profiling.settings.ProfileSettings` and
:class:`search.settings.SearchSettings`, starts at their defaults and is checked by their validators
as you type (:mod:`empas_tui.tui.config`); the message under a field is what the CLI would print.
"""

from __future__ import annotations

import logging

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Input, Label, Select

from ..config import (GGML_ONLY, RTN_ONLY, RunConfig, default_qtypes_text, form_fields, form_values, parse_form,
                      suggest_study_name)
from ..messages import StudyNames

log = logging.getLogger(__name__)


class SetupScreen(Screen):
    TITLE_TEXT = "Setup"
    HELP = """\
Choose what to quantise and how to measure it. Every field starts at the default `empas profile` /
`empas search` use and is checked as you type; the message under a field says how to fix it.
**ctrl+s** (or the button) starts profiling: each layer is quantised alone at each type and its KL
divergence to the dense model is measured. Measurements are cached in the storage, so the same model +
calibration + quantiser is profiled only once.

- **Model**: `default` is SmolLM2-135M-Instruct (its dense baseline is the dequantised Q4_1 GGUF).
- **Quantiser**: `ggml` offers llama.cpp's types (ships as GGUF); `rtn` bit-widths 2-8 and 16
  (ships as a packed checkpoint). Each layer is offered only the types that fit its shape (K-quants
  need rows that are a multiple of 256).
- **Granularity** `block` is fast (30 genes on SmolLM2); `linear` is finer (210 genes) and slower.
- **Calibration**: 512 tokens is a good start on a laptop CPU; more tokens = less noise, more time.
- **Evaluate** `proxy` scores each genome with the profile (thousands of trials a second); `measured`
  quantises the whole genome and measures its KL (a second or more per trial: use a small population).
- Empty search fields mean the defaults shown in grey. **Max MiB**: an optional budget; genomes above
  it are infeasible (kept, never on the front).
"""
    BINDINGS = [
        Binding("ctrl+s", "start", "Start", priority=True),
        Binding("escape", "app.pop_screen", "Back"),
    ]
    PALETTE = [("Start profiling", "Check the setup and start measuring layer sensitivities", "start")]

    def __init__(self, cfg: RunConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.fields = form_fields()
        self.existing: set[str] = set()
        self.errors: dict[str, str] = {}
        self._auto_name = ""  # the study name we suggested; replaced as the settings change
        self._quantizer = ""  # the quantiser whose default types the types field may still hold
        self._summary = ""

    def compose(self) -> ComposeResult:
        values = form_values(self.cfg)
        yield Header()
        with VerticalScroll(id="setup-form"):
            for f in self.fields:
                with Horizontal(classes="field", id=f"{f.name}-row"):
                    yield Label(f.label, classes="field-label")
                    if f.is_select:
                        yield Select(list(f.options), value=values[f.name], allow_blank=False, compact=True, id=f.name)
                    else:
                        yield Input(value=values[f.name], placeholder=f.placeholder or f.help, compact=True, id=f.name,
                                    tooltip=f.help)
                yield Label("", id=f"{f.name}-error", classes="field-error")
        # outside the scrolled form: the summary and the buttons stay on screen however long the form is
        with Vertical(id="setup-actions"):
            yield Label("", id="setup-summary", classes="dim")
            with Horizontal(classes="buttons"):
                yield Button("Start profiling (ctrl+s)", variant="primary", id="start")
                yield Button("Back (esc)", id="back")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "new study"
        self._quantizer = self.value("quantizer")
        if self.app.default_model and self.cfg is None:
            self.query_one("#model", Input).value = self.app.default_model
        self._show_quantizer_fields()
        self.query_one("#model", Input).focus()
        self._load_names()
        self.refresh_checks()

    def value(self, name: str) -> str:
        widget = self.query_one(f"#{name}")
        return str(widget.value)

    def values(self) -> dict[str, str]:
        return {f.name: self.value(f.name) for f in self.fields}

    @work(thread=True, exit_on_error=False, group="setup-names")
    def _load_names(self) -> None:
        from search.catalogue import list_studies

        try:
            names = {s["name"] for s in list_studies(self.app.db)}
        except Exception:  # storage trouble: the profile screen will say so
            log.exception("listing studies failed")
            names = set()
        self.post_message(StudyNames(names))

    def on_study_names(self, message: StudyNames) -> None:
        self.existing = message.names
        self._suggest_name()
        self.refresh_checks()

    def _suggest_name(self) -> None:
        """Name the study as the CLI would until the user types a name of their own."""
        study = self.query_one("#study", Input)
        current = study.value.strip()
        if current and current != self._auto_name and not (self.cfg and current == self.cfg.study):
            return
        cfg, _ = parse_form(self.values() | {"study": "name"}, set())
        if cfg is None:
            return
        self._auto_name = suggest_study_name(cfg, self.existing)
        if study.value != self._auto_name:
            study.value = self._auto_name

    def _show_quantizer_fields(self) -> None:
        rtn = self.value("quantizer") == "rtn"
        for name in RTN_ONLY:
            self.query_one(f"#{name}-row").display = rtn
        for name in GGML_ONLY:
            self.query_one(f"#{name}-row").display = not rtn

    # -- checks -------------------------------------------------------------------------------------

    def refresh_checks(self) -> RunConfig | None:
        """Check every field; show each message under its field; the config when all are fine."""
        cfg, errors = parse_form(self.values(), self.existing)
        for f in self.fields:
            message = errors.get(f.name, "")
            if message == self.errors.get(f.name, ""):
                continue  # restyling a widget is the costly part: touch only what changed
            label = self.query_one(f"#{f.name}-error", Label)
            label.update(message)
            label.display = bool(message)
            self.query_one(f"#{f.name}").set_class(bool(message), "-invalid")
        self.errors = errors
        text = f"{cfg.profile.summary()} | {cfg.search_summary()}" if cfg else ""
        if text != self._summary:
            self._summary = text
            self.query_one("#setup-summary", Label).update(text)
        return cfg

    @on(Input.Changed)
    def _changed(self, event: Input.Changed) -> None:
        if event.input.id in ("model", "qtypes"):
            self._suggest_name()
        self.refresh_checks()

    @on(Select.Changed)
    def _select_changed(self, event: Select.Changed) -> None:
        if event.select.id == "quantizer" and str(event.value) != self._quantizer:
            types = self.query_one("#qtypes", Input)
            if types.value.strip() in ("", default_qtypes_text(self._quantizer)):
                types.value = default_qtypes_text(str(event.value))  # the new quantiser's own defaults
            self._quantizer = str(event.value)
            self._show_quantizer_fields()
        self._suggest_name()
        self.refresh_checks()

    # -- start --------------------------------------------------------------------------------------

    def action_start(self) -> None:
        cfg = self.refresh_checks()
        if cfg is None:
            first = next((f.name for f in self.fields if f.name in self.errors), None)
            if first:
                self.query_one(f"#{first}").focus()
            self.notify("Fix the fields marked in red first.", severity="warning")
            return
        self.app.open_profile(cfg)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "start":
            self.action_start()
        else:
            self.app.pop_screen()

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        self.focus_next()
