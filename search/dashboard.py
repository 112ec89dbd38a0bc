"""optuna-dashboard served in-process on 127.0.0.1, for ``empas dashboard`` and the TUI.

``optuna_dashboard.wsgi(storage)`` is a plain WSGI app; a threading ``wsgiref`` server runs it on the
loopback interface only (reach it from elsewhere with ``ssh -L``). Port 0 picks a free port.
"""

from __future__ import annotations

import socketserver
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from storage.studies import open_fast_read_storage
from storage.urls import StorageError, resolve_storage_url

HOST = "127.0.0.1"


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args) -> None:  # the dashboard polls every few seconds: keep stderr clean
        pass


@dataclass
class DashboardServer:
    server: WSGIServer
    thread: threading.Thread | None
    port: int

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/dashboard/"

    def serve_forever(self) -> None:
        self.server.serve_forever()

    def shutdown(self) -> None:
        if self.thread is not None:
            self.server.shutdown()
            self.thread.join(timeout=5)
        self.server.server_close()


def start_dashboard(storage_url: str | None = None, port: int = 0, background: bool = True) -> DashboardServer:
    """Start optuna-dashboard for the storage; ``background`` runs it in a daemon thread."""
    import optuna_dashboard

    if not 0 <= int(port) <= 65535:
        raise StorageError(f"port {port} is not valid: pass 0 (any free port) or 1-65535")
    storage = open_fast_read_storage(resolve_storage_url(storage_url))
    app = optuna_dashboard.wsgi(storage)
    try:
        server = make_server(HOST, int(port), app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)
    except OSError as exc:
        raise StorageError(f"cannot listen on {HOST}:{port} ({exc.strerror or exc}): pass another --port or 0") from None
    thread = None
    if background:
        thread = threading.Thread(target=server.serve_forever, name="empas-dashboard", daemon=True)
        thread.start()
    return DashboardServer(server, thread, server.server_port)
