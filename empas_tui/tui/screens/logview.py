"""The log panel: everything Optuna, transformers and EMPAS log, which must never draw over the UI."""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Header, Label, RichLog


class LogScreen(Screen):
    TITLE_TEXT = "Log"
    HELP = "Messages from Optuna, transformers and EMPAS, newest last. They are also written to the log file."
    BINDINGS = [Binding("escape,l", "app.pop_screen", "Back")]

    def __init__(self, lines: list[str], path: Path | None) -> None:
        super().__init__()
        self.lines, self.path = lines, path

    def compose(self) -> ComposeResult:
        yield Header()
        yield Label(f"log file: {self.path}" if self.path else "log file: none (in-app only)", classes="dim")
        yield RichLog(id="log", max_lines=2000, wrap=True, markup=False, highlight=False)
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "log"
        view = self.query_one(RichLog)
        for line in self.lines:
            view.write(line)
        if not self.lines:
            view.write("(nothing logged yet)")

    def append_log(self, line: str) -> None:
        self.query_one(RichLog).write(line)
