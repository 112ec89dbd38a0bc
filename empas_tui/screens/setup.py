"""Setup: model, bit-widths, granularity, metric, calibration and search size, checked as you type."""

from __future__ import annotations

import logging

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Input, Label, Select

from .state import FIELD_CHECKS, RunConfig, check_study, check_tokens, one_line, suggest_study_name

log = logging.getLogger(__name__)

# (field, label, placeholder/help)
TEXT_FIELDS = [
    ("model", "Model", "default = embedded SmolLM2-135M; or a Hugging Face id, a folder, a .gguf file"),
    ("bits", "Bit-widths", "comma-separated, 2-8 and 16 (16 = keep a layer unquantised)"),
    ("group_size", "Group size", "quantiser group: input columns sharing a scale and zero (64)"),
    ("text_file", "Calibration text", "plain-text file; empty = built-in English corpus"),
    ("calib_tokens", "Calib. tokens", "tokens used to measure each layer's sensitivity"),
    ("heldout_tokens", "Held-out tokens", "tokens kept aside to measure the archetypes"),
    ("seq_len", "Sequence length", "tokens per sequence"),
    ("study", "Study name", "where the search is stored; resume it later by this name"),
    ("population", "Population", "NSGA-II genomes per generation"),
    ("generations", "Generations", "trials = population x generations"),
    ("seed", "Seed", "random seed of the search"),
    ("max_mib", "Max MiB", "optional memory budget; empty = none"),
]
SELECTS = {
    "granularity": ("Granularity", [("block: one bit-width per decoder block", "block"),
                                    ("linear: one per linear layer (q,k,v,o,gate,up,down)", "linear")]),
    "metric": ("Metric", [("kl: measured KL to the dense model (default)", "kl"),
                          ("fisher: fast Fisher estimate of the KL", "fisher")]),
    "evaluate": ("Evaluate", [("proxy: predicted loss, sum of the profile (fast)", "proxy"),
                              ("measured: real KL of every genome (slow, exact)", "measured")]),
}
INVALID = object()  # a field check failed (None is a valid value: "no memory budget")

ORDER = ["model", "bits", "granularity", "metric", "group_size", "text_file", "calib_tokens", "heldout_tokens",
         "seq_len", "study", "evaluate", "population", "generations", "seed", "max_mib"]


def _text(cfg: RunConfig, name: str) -> str:
    value = getattr(cfg, name)
    if name == "bits":
        return ",".join(map(str, value))
    return "" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


class SetupScreen(Screen):
    TITLE_TEXT = "Setup"
    HELP = """\
Choose what to quantise and how to measure it. Every field is checked as you type; the message under a
field says how to fix it. **ctrl+s** (or the button) starts profiling: each layer is quantised alone at
each bit-width and its KL divergence to the dense model is measured. Measurements are cached in the
storage, so the same model + calibration + quantiser is profiled only once.

- **Model**: `default` is SmolLM2-135M-Instruct (its dense baseline is the dequantised Q4_1 GGUF).
- **Granularity** `block` is fast (30 genes on SmolLM2); `linear` is finer (210 genes) and slower.
- **Calibration**: 512 tokens is a good start on a laptop CPU; more tokens = less noise, more time.
- **Evaluate** `proxy` scores each genome with the profile (thousands of trials a second); `measured`
  quantises the whole genome and measures its KL (a second or more per trial: use a small population).
- **Max MiB**: optional budget; genomes above it are infeasible for NSGA-II (kept, never on the front).
"""
    BINDINGS = [
        Binding("ctrl+s", "start", "Start profiling", priority=True),
        Binding("escape", "app.pop_screen", "Back"),
    ]
    PALETTE = [("Start profiling", "Check the setup and start measuring layer sensitivities", "start")]

    def __init__(self, cfg: RunConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or RunConfig()
        self.existing: set[str] = set()
        self.errors: dict[str, str] = {}
        self._auto_name = ""  # the study name we suggested; replaced as the model/granularity change

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="setup-form"):
            for name in ORDER:
                with Horizontal(classes="field"):
                    if name in SELECTS:
                        label, options = SELECTS[name]
                        yield Label(label, classes="field-label")
                        yield Select(options, value=getattr(self.cfg, name), allow_blank=False, compact=True,
                                     id=name)
                    else:
                        _, label, help_text = next(f for f in TEXT_FIELDS if f[0] == name)
                        yield Label(label, classes="field-label")
                        yield Input(value=_text(self.cfg, name), placeholder=help_text, compact=True, id=name,
                                    tooltip=help_text)
                yield Label("", id=f"{name}-error", classes="field-error")
            yield Label("", id="setup-summary", classes="dim")
            with Horizontal(classes="buttons"):
                yield Button("Start profiling (ctrl+s)", variant="primary", id="start")
                yield Button("Back (esc)", id="back")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "new study"
        if self.app.default_model and self.cfg.model == "default":
            self.query_one("#model", Input).value = self.app.default_model
        self.query_one("#model", Input).focus()
        self._load_names(self.app.storage_url)
        self._update_summary()

    @work(thread=True, exit_on_error=False, group="setup-names")
    def _load_names(self, url: str) -> None:
        from .studies import list_studies_rows

        try:
            names = {s["name"] for s in list_studies_rows(url)}
        except Exception:  # no search engine / storage trouble: the start check will say so
            names = set()
        self.app.call_from_thread(self._names_loaded, names)

    def _names_loaded(self, names: set[str]) -> None:
        self.existing = names
        study = self.query_one("#study", Input)
        if not study.value.strip() or study.value.strip() in names or study.value == self.cfg.study:
            self._suggest_name()

    def _suggest_name(self) -> None:
        """Name the study after the model, granularity and metric until the user types a name."""
        study = self.query_one("#study", Input)
        if study.value.strip() and study.value != self._auto_name and study.value != self.cfg.study:
            return
        cfg = self.cfg.with_(model=self.query_one("#model", Input).value.strip() or "default",
                             granularity=self.query_one("#granularity", Select).value,
                             metric=self.query_one("#metric", Select).value)
        self._auto_name = suggest_study_name(cfg, self.existing)
        study.value = self._auto_name

    # -- checks -------------------------------------------------------------------------------------

    def _check(self, name: str, text: str):
        try:
            if name == "study":
                value = check_study(text, self.existing)
            else:
                value = FIELD_CHECKS[name](text)
        except Exception as exc:  # the engine's validators raise ValueError subclasses with the fix
            self._set_error(name, one_line(exc))
            return INVALID
        self._set_error(name, "")
        return value

    def _set_error(self, name: str, message: str) -> None:
        label = self.query_one(f"#{name}-error", Label)
        label.update(message)
        label.display = bool(message)
        widget = self.query_one(f"#{name}")
        widget.set_class(bool(message), "-invalid")
        if message:
            self.errors[name] = message
        else:
            self.errors.pop(name, None)

    @on(Input.Changed)
    def _changed(self, event: Input.Changed) -> None:
        if event.input.id in FIELD_CHECKS or event.input.id == "study":
            self._check(event.input.id, event.value)
            if event.input.id == "model":
                self._suggest_name()
            self._update_summary()

    @on(Select.Changed)
    def _select_changed(self, event: Select.Changed) -> None:
        self._suggest_name()
        self._update_summary()

    def _update_summary(self) -> None:
        cfg = self.collect(quiet=True)
        text = ""
        if cfg:
            budget = f", <= {cfg.max_mib:g} MiB" if cfg.max_mib else ""
            text = f"{cfg.summary()} | {cfg.evaluate} search: {cfg.population} x {cfg.generations} = {cfg.trials} trials{budget}"
        self.query_one("#setup-summary", Label).update(text)

    def collect(self, quiet: bool = False) -> RunConfig | None:
        """The config from the form, or None (with every problem shown under its field)."""
        values = {}
        ok = True
        for name in ORDER:
            widget = self.query_one(f"#{name}")
            if isinstance(widget, Select):
                values[name] = widget.value
                continue
            value = self._check(name, widget.value) if not quiet else self._quiet(name, widget.value)
            if value is INVALID:
                ok = False
            else:
                values[name] = value
        if not ok:
            return None
        cfg = self.cfg.with_(**values)
        try:
            check_tokens(cfg)
        except Exception as exc:
            if not quiet:
                field = "text_file" if cfg.text_file and "file" in str(exc) else "calib_tokens"
                self._set_error(field, one_line(exc))
            return None
        return cfg

    def _quiet(self, name: str, text: str):
        try:
            return check_study(text, self.existing) if name == "study" else FIELD_CHECKS[name](text)
        except Exception:
            return INVALID

    # -- start --------------------------------------------------------------------------------------

    def action_start(self) -> None:
        cfg = self.collect()
        if cfg is None:
            first = next(iter(self.errors), None)
            if first:
                self.query_one(f"#{first}").focus()
            self.notify("Fix the fields marked in red first.", severity="warning")
            return
        from .profile import ProfileScreen

        self.app.push_screen(ProfileScreen(cfg))

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "start":
            self.action_start()
        else:
            self.app.pop_screen()

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        self.focus_next()
