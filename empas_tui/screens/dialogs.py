"""Small modal screens: help, yes/no confirmation, and a path prompt."""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Input, Label, Markdown, Static

GENERAL_HELP = """\
### Everywhere
| key | action |
|---|---|
| `ctrl+p` | command palette (every action, plus *Theme*) |
| `?` | this help |
| `l` | log (Optuna, transformers and EMPAS messages never draw over the screen) |
| `w` | optuna-dashboard: start/stop, URL, SSH tunnel hint |
| `escape` | back |
| `ctrl+q` | quit (a running search stops after the current generation and can be resumed) |

### The flow
Studies -> **n** new: setup (model, bits, calibration) -> **profile** (how much each layer hurts at
each bit-width) -> **search** (NSGA-II over per-layer bit-widths; live Pareto front) -> **archetypes**
(pick, measure on held-out text, export JSON).
"""


class HelpScreen(ModalScreen[None]):
    """The help of the screen underneath (its ``HELP`` markdown) and the app-wide keys."""

    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close")]

    def __init__(self, under: Screen) -> None:
        super().__init__()
        self.under = under

    def compose(self) -> ComposeResult:
        title = getattr(self.under, "TITLE_TEXT", type(self.under).__name__)
        text = getattr(self.under, "HELP", "") or ""
        with Vertical(id="help-box", classes="dialog"):
            yield Label(f"Help - {title}", classes="dialog-title")
            with VerticalScroll():
                yield Markdown(f"{text}\n\n{GENERAL_HELP}")
            yield Label("escape / ? to close", classes="dim")

    def action_dismiss(self) -> None:
        self.dismiss(None)


class ConfirmScreen(ModalScreen[bool]):
    """Ask before doing something that cannot be undone."""

    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str, yes: str = "Delete") -> None:
        super().__init__()
        self.question, self.yes = question, yes

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.question, classes="dialog-text")
            with Horizontal(classes="dialog-buttons"):
                yield Button(f"{self.yes} (y)", variant="error", id="yes")
                yield Button("Cancel (n)", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, value: bool) -> None:
        self.dismiss(value)


class PathPrompt(ModalScreen[Path | None]):
    """Ask for a file path to write; refuses a missing folder inline instead of failing later."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, default: str) -> None:
        super().__init__()
        self.title_text, self.default = title, default

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.title_text, classes="dialog-title")
            yield Input(value=self.default, id="path")
            yield Label("", id="path-error", classes="error")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Write (enter)", variant="primary", id="ok")
                yield Button("Cancel (esc)", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#path", Input).focus()

    def _check(self, text: str) -> str:
        if not text.strip():
            return "type a file path, e.g. ./balanced.json"
        p = Path(text).expanduser()
        if p.is_dir():
            return f"{p} is a folder: add a file name, e.g. {p / 'archetype.json'}"
        if not p.resolve().parent.is_dir():
            return f"folder {p.resolve().parent} does not exist: create it or pick another path"
        return ""

    def on_input_changed(self, event: Input.Changed) -> None:
        self.query_one("#path-error", Label).update(self._check(event.value))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "ok":
            self._submit()
        else:
            self.dismiss(None)

    def _submit(self) -> None:
        text = self.query_one("#path", Input).value
        error = self._check(text)
        self.query_one("#path-error", Label).update(error)
        if not error:
            self.dismiss(Path(text).expanduser())

    def action_cancel(self) -> None:
        self.dismiss(None)


class BudgetPrompt(ModalScreen[tuple[float | None, float | None] | None]):
    """Memory and/or perplexity budgets for the archetypes; empty = no budget."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, max_mib: float | None, max_rise_pct: float | None) -> None:
        super().__init__()
        self.initial = ("" if max_mib is None else f"{max_mib:g}", "" if max_rise_pct is None else f"{max_rise_pct:g}")

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Archetype budgets (empty = none)", classes="dialog-title")
            yield Label("Best accuracy under this many MiB:")
            yield Input(value=self.initial[0], placeholder="e.g. 110", id="max-mib")
            yield Label("Smallest model under this PPL rise (%), also the max-compression cap (25):")
            yield Input(value=self.initial[1], placeholder="e.g. 10", id="max-rise")
            yield Label("", id="budget-error", classes="error")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Apply (enter)", variant="primary", id="ok")
                yield Button("Cancel (esc)", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#max-mib", Input).focus()

    @staticmethod
    def _number(text: str, what: str) -> float | None:
        text = text.strip().rstrip("%").strip()
        if not text:
            return None
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{what} must be a number or empty") from None
        if not value >= 0 or value != value:
            raise ValueError(f"{what} must be a positive number or empty")
        return value

    def _submit(self) -> None:
        try:
            mib = self._number(self.query_one("#max-mib", Input).value, "memory budget")
            rise = self._number(self.query_one("#max-rise", Input).value, "PPL rise")
            if mib is not None and mib == 0:
                raise ValueError("memory budget must be above 0 MiB")
        except ValueError as exc:
            self.query_one("#budget-error", Label).update(str(exc))
            return
        self.dismiss((mib, rise))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "max-mib":
            self.query_one("#max-rise", Input).focus()
        else:
            self._submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "ok":
            self._submit()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)
