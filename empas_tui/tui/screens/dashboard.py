"""optuna-dashboard for the current storage, served in-process on 127.0.0.1 only.

Over SSH the browser is on another machine: the screen shows the ``ssh -L`` command that forwards the
port, and ``c`` copies the URL with OSC 52 (the terminal's clipboard, which works through SSH in most
terminals). The server keeps running while you use other screens; it stops on ``s`` or when the app
quits.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Footer, Header, Label, Static

from ..format import one_line
from ..messages import DashboardStarted

log = logging.getLogger(__name__)


def ssh_hint(port: int, environ=os.environ) -> str:
    """The tunnel command to run on the laptop. Inside an SSH session the address the user connected
    to (``SSH_CONNECTION``'s third field) is the one that works from the laptop; else the host name."""
    user = environ.get("USER") or getpass.getuser()
    parts = environ.get("SSH_CONNECTION", "").split()
    host = parts[2] if len(parts) >= 4 else socket.gethostname()
    if ":" in host:  # IPv6
        host = f"[{host}]"
    return f"ssh -N -L {port}:127.0.0.1:{port} {user}@{host}"


class DashboardScreen(Screen):
    TITLE_TEXT = "Dashboard"
    HELP = """\
optuna-dashboard shows every study in the storage: trials, Pareto front, parameter importances (the
per-layer types are the parameters). It listens on 127.0.0.1 only.

On a remote machine, run the `ssh -L` command shown on your laptop, then open the URL there.

| key | action |
|---|---|
| `s` | start / stop the dashboard |
| `c` | copy the URL to the clipboard (OSC 52: works over SSH in most terminals) |
| `escape` | back (the dashboard keeps running) |
"""
    BINDINGS = [
        Binding("s", "toggle", "Start/Stop"),
        Binding("c", "copy", "Copy URL"),
        Binding("escape", "app.pop_screen", "Back"),
    ]
    PALETTE = [
        ("Start/stop dashboard", "Serve optuna-dashboard for this storage on 127.0.0.1", "toggle"),
        ("Copy dashboard URL", "Copy the URL to the clipboard (works over SSH)", "copy"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.starting = False

    def compose(self) -> ComposeResult:
        from storage.urls import redact

        yield Header()
        with Vertical(id="dash-box"):
            yield Label(f"storage {redact(self.app.storage_url)}", classes="dim")
            yield Static("", id="dash-state")
            yield Static("", id="dash-url")
            yield Static("", id="dash-ssh")
            yield Static("", id="dash-hint", classes="hint")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "dashboard"
        self._show()

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action == "copy":
            return self.app.dashboard is not None or None
        return True

    def _show(self) -> None:
        handle = self.app.dashboard
        state = self.query_one("#dash-state", Static)
        if self.starting:
            state.update("starting...")
        elif handle is None:
            state.update("[b]stopped[/]. Press [b]s[/] to start optuna-dashboard on 127.0.0.1.")
            self.query_one("#dash-url", Static).update("")
            self.query_one("#dash-ssh", Static).update("")
            self.query_one("#dash-hint", Static).update("")
        else:
            state.update("[b green]running[/] (stops when you press s or quit EMPAS)")
            self.query_one("#dash-url", Static).update(f"URL  [b]{handle.url}[/]   ([b]c[/] copies it)")
            self.query_one("#dash-ssh", Static).update(
                f"From your laptop (remote machine):\n  [b]{ssh_hint(handle.port)}[/]\n"
                f"then open {handle.url} in the laptop's browser.")
            self.query_one("#dash-hint", Static).update(
                "Studies appear by name; the trial parameters are the per-layer types.")
        self.refresh_bindings()

    def action_toggle(self) -> None:
        if self.starting:
            return
        if self.app.dashboard is not None:
            self.app.stop_dashboard()
            self.notify("Dashboard stopped.")
            self._show()
            return
        self.starting = True
        self._show()
        self._start(self.app.storage_url)

    @work(thread=True, exclusive=True, group="dashboard", exit_on_error=False)
    def _start(self, url: str) -> None:
        from search.dashboard import start_dashboard

        try:
            handle = start_dashboard(url, port=0)
        except Exception as exc:
            log.exception("dashboard failed to start")
            self.post_message(DashboardStarted(error=one_line(exc)))
            return
        self.post_message(DashboardStarted(handle))

    def on_dashboard_started(self, message: DashboardStarted) -> None:
        self.starting = False
        if message.error:
            self.notify(message.error, title="Dashboard", severity="error", timeout=10)
        else:
            if self.app.dashboard is not None:  # started twice: keep one
                message.handle.shutdown()
            else:
                self.app.dashboard = message.handle
            self.notify(f"optuna-dashboard at {message.handle.url}", title="Dashboard")
        self._show()

    def action_copy(self) -> None:
        handle = self.app.dashboard
        if handle is None:
            return
        self.app.copy_to_clipboard(handle.url)
        self.notify("URL copied (OSC 52: your terminal must allow clipboard access).", timeout=4)
