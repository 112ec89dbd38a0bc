"""optuna-dashboard served in-process on 127.0.0.1, for ``empas dashboard`` and the TUI.

``optuna_dashboard.wsgi(storage)`` is a plain WSGI app; a threading ``wsgiref`` server runs it on the
loopback interface only (reach it from elsewhere with ``ssh -L``). Port 0 picks a free port. Requests
addressed to another host name (DNS rebinding) and cross-origin writes are refused (:class:`LoopbackOnly`).

Two things make large studies open faster than ``optuna-dashboard URL`` would:

- the storage reads trials column-wise (:func:`storage.studies.fast_read_storage`), ~8x faster
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

from storage.database import open_database
from storage.studies import fast_read_storage, study_version
from storage.urls import StorageError

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


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]", "::1")
UNSAFE_METHODS = ("POST", "PUT", "PATCH", "DELETE")


def host_name(host_header: str) -> str:
    """The name in a Host header, without the port ("[::1]:8080" -> "[::1]")."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class LoopbackOnly:
    """WSGI middleware: answer only requests addressed to the loopback name, and no cross-site writes.

    Binding 127.0.0.1 keeps other machines out, not other web sites: a page the user opens can point
    its own host name at 127.0.0.1 (DNS rebinding) and then talk to the dashboard as same-origin; the
    browser still sends that page's name as ``Host``, so any Host but a loopback name gets 403. A
    page on another origin can also send writes (a form POST, a fetch) that need no answer to do harm:
    state-changing methods are refused when ``Origin`` is not this server's own, or when the browser's
    ``Sec-Fetch-Site`` says cross-site. Any port is accepted in Host, so ``ssh -L 9000:127.0.0.1:8080``
    works; tools that send neither header (curl, scripts) are not browsers and are let through."""

    def __init__(self, app):
        self.app = app

    @staticmethod
    def refusal(environ) -> str | None:
        host = environ.get("HTTP_HOST") or ""
        if host_name(host) not in LOOPBACK_NAMES:
            return f"Host {host[:80]!r} is not this machine's loopback address: open http://127.0.0.1:<port>/"
        if environ.get("REQUEST_METHOD", "GET").upper() in UNSAFE_METHODS:
            origin = environ.get("HTTP_ORIGIN")
            if origin is not None and origin.strip().lower() != f"http://{host.strip().lower()}":
                return f"cross-origin {environ.get('REQUEST_METHOD')} from {origin[:80]!r} refused"
            site = (environ.get("HTTP_SEC_FETCH_SITE") or "").lower()
            if site and site not in ("same-origin", "none"):
                return f"{site} {environ.get('REQUEST_METHOD')} refused"
        return None

    def __call__(self, environ, start_response):
        why = self.refusal(environ)
        if why is None:
            return self.app(environ, start_response)
        body = (why + "\n").encode()
        start_response("403 Forbidden", [("Content-Type", "text/plain; charset=utf-8"),
                                         ("Content-Length", str(len(body)))])
        return [body]


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
    storage = fast_read_storage(open_database(storage_url))
    app = CachingStudyEndpoint(optuna_dashboard.wsgi(storage), storage)
    try:
        server = make_server(HOST, int(port), LoopbackOnly(app), server_class=_ThreadingWSGIServer,
                             handler_class=_QuietHandler)
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
