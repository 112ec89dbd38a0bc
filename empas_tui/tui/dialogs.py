"""Small modal screens any screen may open: help, yes/no confirmation, a folder prompt, budgets."""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Input, Label, Markdown, Static

from search.archetypes import DEFAULT_PPL_RISE_CAP

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
Studies -> **n** new: setup (model, quantiser and its types, calibration) -> **profile** (how much
each layer hurts at each type) -> **search** (NSGA-II over per-layer types; live Pareto front) ->
**archetypes** (pick, measure on held-out text, export).
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


class FormDialog(ModalScreen):
    """A dialog with inputs, an OK and a Cancel button: enter/OK runs ``_submit`` (which dismisses with
    the answer, or shows why not), escape/Cancel dismisses with None."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]
    OK_LABEL = "OK (enter)"

    def buttons(self) -> ComposeResult:
        with Horizontal(classes="dialog-buttons"):
            yield Button(self.OK_LABEL, variant="primary", id="ok")
            yield Button("Cancel (esc)", id="cancel")

    def _submit(self) -> None:  # pragma: no cover - each dialog implements it
        raise NotImplementedError

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "ok":
            self._submit()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class FolderPrompt(FormDialog):
    """Ask for a folder to write into (created if missing); refuses an existing file inline."""

    OK_LABEL = "Write (enter)"

    def __init__(self, title: str, default: str, note: str = "") -> None:
        super().__init__()
        self.title_text, self.default, self.note = title, default, note

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.title_text, classes="dialog-title")
            if self.note:
                yield Static(self.note, classes="dialog-text")
            yield Input(value=self.default, id="path")
            yield Label("", id="path-error", classes="error")
            yield from self.buttons()

    def on_mount(self) -> None:
        self.query_one("#path", Input).focus()

    @staticmethod
    def check(text: str) -> str:
        if not text.strip():
            return "type a folder, e.g. ./archetypes"
        p = Path(text).expanduser()
        if p.exists() and not p.is_dir():
            return f"{p} is a file: pick a folder (it is created if missing)"
        parent = next((a for a in p.resolve().parents if a.exists()), None)
        if parent is not None and not parent.is_dir():
            return f"{parent} is a file, not a folder: pick another path"
        return ""

    def on_input_changed(self, event: Input.Changed) -> None:
        self.query_one("#path-error", Label).update(self.check(event.value))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._submit()

    def _submit(self) -> None:
        text = self.query_one("#path", Input).value
        error = self.check(text)
        self.query_one("#path-error", Label).update(error)
        if not error:
            self.dismiss(Path(text).expanduser())


class BudgetPrompt(FormDialog):
    """Memory and/or perplexity budgets for the archetypes; empty = no budget."""

    OK_LABEL = "Apply (enter)"

    def __init__(self, max_mib: float | None, max_rise_pct: float | None) -> None:
        super().__init__()
        self.initial = ("" if max_mib is None else f"{max_mib:g}", "" if max_rise_pct is None else f"{max_rise_pct:g}")

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Archetype budgets (empty = none)", classes="dialog-title")
            yield Label("Best accuracy under this many MiB:")
            yield Input(value=self.initial[0], placeholder="e.g. 110", id="max-mib")
            yield Label(f"Smallest model under this PPL rise (%), also the max-compression cap "
                        f"(default {100 * DEFAULT_PPL_RISE_CAP:g}):")
            yield Input(value=self.initial[1], placeholder="e.g. 10", id="max-rise")
            yield Label("", id="budget-error", classes="error")
            yield from self.buttons()

    def on_mount(self) -> None:
        self.query_one("#max-mib", Input).focus()

    @staticmethod
    def _number(text: str, flag: str):
        text = text.strip().rstrip("%").strip()
        if not text:
            return None
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{flag} must be a number, got {text!r} (or leave it empty)") from None

    def _submit(self) -> None:
        from search.export_settings import ExportSettings

        try:
            mib = self._number(self.query_one("#max-mib", Input).value, "--max-mib")
            rise = self._number(self.query_one("#max-rise", Input).value, "--max-ppl-rise")
            # the export's own checks, so the budget is refused in the words `empas export` uses
            ExportSettings(study="-", output="-", max_mib=mib, max_ppl_rise=rise).validate_settings()
        except ValueError as exc:
            self.query_one("#budget-error", Label).update(str(exc))
            return
        self.dismiss((mib, rise))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "max-mib":
            self.query_one("#max-rise", Input).focus()
        else:
            self._submit()
