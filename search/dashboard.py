"""optuna-dashboard served in-process on 127.0.0.1, for ``empas dashboard`` and the TUI.

``optuna_dashboard.wsgi(storage)`` is a plain WSGI app; a threading ``wsgiref`` server runs it on the
loopback interface only (reach it from elsewhere with ``ssh -L``). Port 0 picks a free port.

Two things make large studies open faster than ``optuna-dashboard URL`` would:

- the storage reads trials column-wise (:func:`storage.studies.open_fast_read_storage`), ~8x faster
  than Optuna's ORM path on 5,000-trial studies;
- the study endpoint (which rebuilds its search-space summary from every trial on *each* request, also
  for the 10 s polls) is answered from a cache while the study is unchanged: same trial count, last
  trial, last completion time and study attributes. Any non-GET request (notes, user attributes edited
  in the dashboard) clears the cache.
"""

from __future__ import annotations

import re
import socketserver
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from storage.studies import open_fast_read_storage, study_version
from storage.urls import StorageError, resolve_storage_url

HOST = "127.0.0.1"


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args) -> None:  # the dashboard polls every few seconds: keep stderr clean
        pass


class CachingStudyEndpoint:
    """WSGI middleware: cache ``GET /api/studies/<id>`` bodies keyed by the study's version."""

    PATH = re.compile(r"/api/studies/(\d+)")
    MAX_ENTRIES = 16
    MAX_AGE_S = 300.0

    DASHBOARD_TTL_S = 10.0  # optuna-dashboard keeps its own trial list up to this long

    def __init__(self, app, storage):
        self.app, self.storage = app, storage
        self.cache: OrderedDict[tuple, tuple] = OrderedDict()
        self.lock = threading.Lock()
        self.versions: dict[int, tuple] = {}
        self.unsafe_until: dict[int, float] = {}

    def _saw(self, study_id: int, version: tuple) -> None:
        """On a change, drop optuna-dashboard's own (up to 10 s old) trial list too, or, if that private
        cache is not there, do not cache bodies until it has expired."""
        previous = self.versions.get(study_id)
        self.versions[study_id] = version
        if previous == version:
            return
        inner = getattr(self.app, "_inmemory_cache", None)
        if inner is not None and hasattr(inner, "clear"):
            inner.clear()
        else:
            self.unsafe_until[study_id] = time.monotonic() + self.DASHBOARD_TTL_S

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD", "GET") != "GET":
            with self.lock:
                self.cache.clear()
            return self.app(environ, start_response)
        match = self.PATH.fullmatch(path)
        if not match:
            return self.app(environ, start_response)
        study_id = int(match.group(1))
        key = (study_id, environ.get("QUERY_STRING", ""))
        try:
            version = study_version(self.storage, study_id)
        except Exception:  # noqa: BLE001 - let the dashboard answer (and report) it
            return self.app(environ, start_response)
        with self.lock:
            self._saw(study_id, version)
            hit = self.cache.get(key)
        if hit and hit[0] == version and time.monotonic() - hit[1] < self.MAX_AGE_S:
            start_response(hit[2], hit[3])
            return [hit[4]]
        captured: dict = {}

        def capture(status, headers, exc_info=None):
            captured["status"], captured["headers"] = status, headers
            return lambda data: None

        body = b"".join(self.app(environ, capture))
        if captured["status"].startswith("200") and time.monotonic() >= self.unsafe_until.get(study_id, 0.0):
            with self.lock:
                self.cache[key] = (version, time.monotonic(), captured["status"], captured["headers"], body)
                self.cache.move_to_end(key)
                while len(self.cache) > self.MAX_ENTRIES:
                    self.cache.popitem(last=False)
        start_response(captured["status"], captured["headers"])
        return [body]


    def warm(self, study_id: int, query: str = "after=0") -> None:
        """Compute and cache the study endpoint now (what the page asks for first)."""
        from wsgiref.util import setup_testing_defaults

        environ: dict = {}
        setup_testing_defaults(environ)
        environ.update({"REQUEST_METHOD": "GET", "PATH_INFO": f"/api/studies/{study_id}", "QUERY_STRING": query})
        for _ in self(environ, lambda status, headers, exc_info=None: None):
            pass


@dataclass
class DashboardServer:
    server: WSGIServer
    thread: threading.Thread | None
    port: int
    app: CachingStudyEndpoint | None = None

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


def start_dashboard(storage_url: str | None = None, port: int = 0, background: bool = True,
                    warm: bool = False) -> DashboardServer:
    """Start optuna-dashboard for the storage; ``background`` runs it in a daemon thread; ``warm``
    prepares the most recently updated study's page in a background thread (so opening it is instant)."""
    import optuna_dashboard

    if not 0 <= int(port) <= 65535:
        raise StorageError(f"port {port} is not valid: pass 0 (any free port) or 1-65535")
    storage = open_fast_read_storage(resolve_storage_url(storage_url))
    app = CachingStudyEndpoint(optuna_dashboard.wsgi(storage), storage)
    try:
        server = make_server(HOST, int(port), app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)
    except OSError as exc:
        raise StorageError(f"cannot listen on {HOST}:{port} ({exc.strerror or exc}): pass another --port or 0") from None
    thread = None
    if background:
        thread = threading.Thread(target=server.serve_forever, name="empas-dashboard", daemon=True)
        thread.start()
    if warm:
        threading.Thread(target=_warm_latest, args=(app, storage), name="empas-dashboard-warm", daemon=True).start()
    return DashboardServer(server, thread, server.server_port, app)


def _warm_latest(app: CachingStudyEndpoint, storage) -> None:
    from storage.studies import trial_counts

    try:
        counts = trial_counts(storage)
        latest = max((c["last"], sid) for sid, c in counts.items() if c["last"] is not None)[1] if counts else None
        if latest is not None:
            app.warm(latest)
            app.warm(latest, f"after={sum(counts[latest]['states'].values())}")  # the page's first poll
    except Exception:  # noqa: BLE001 - warming is an optimisation only
        pass
