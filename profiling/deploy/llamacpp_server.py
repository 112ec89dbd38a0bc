"""A GGUF served by llama-cpp-python's OpenAI-compatible server (``llama_cpp.server``), with limits.

The server is llama-cpp-python's own FastAPI app (``/v1/completions``, ``/v1/chat/completions``,
``/v1/models``...) run by uvicorn on a socket bound here first, so a busy port fails in one line
before the model loads. Its settings are built from explicit values only: llama-cpp-python's settings
classes would otherwise read environment variables (``API_KEY``, ``N_CTX``...), and its app reads a
``CONFIG_FILE`` variable that would replace the model, so that one is refused.

Around the app, :class:`LimitsMiddleware` (plain ASGI) keeps one client from starving the others:

- a request body over ``max_body_bytes`` gets 413 before it is read further;
- a completion asking for more than ``max_new_tokens`` gets 400; one that names no ``max_tokens``
  (chat completions would run to the end of the context) gets ``default_new_tokens``;
- the model runs one request at a time; a generating request that finds ``max_queue`` others waiting
  gets 503 with ``Retry-After``;
- uvicorn's ``limit_concurrency`` answers 503 beyond ``max_connections`` open connections.

Generation inside llama-cpp-python's server is not cut by a deadline (it runs in a worker thread that
the app does not interrupt); ``max_new_tokens`` and the context bound how long one request can run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .llamacpp import LlamaCppError, _last_error, _llama_errors, _require_gguf

GENERATING_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/engines/copilot-codex/completions")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServerLimits:
    max_new_tokens: int = 256
    default_new_tokens: int = 64
    max_body_bytes: int = 64 * 1024
    max_queue: int = 4  # generating requests that may wait besides the one running
    max_connections: int = 16

    def check(self) -> "ServerLimits":
        for name in ("max_new_tokens", "default_new_tokens", "max_body_bytes", "max_connections"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LlamaCppError(f"--{name.replace('_', '-')} must be a positive integer")
        if isinstance(self.max_queue, bool) or not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise LlamaCppError("--max-queue must be 0 or more")
        if self.default_new_tokens > self.max_new_tokens:
            raise LlamaCppError("the default number of new tokens exceeds --max-new-tokens: raise --max-new-tokens")
        return self


# -- ASGI limits -----------------------------------------------------------------------------------------

async def _answer(send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": {"message": message, "type": "empas_limit", "code": status}}).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                + extra})
    await send({"type": "http.response.body", "body": body})


class _Refused(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class LimitsMiddleware:
    """Body size, new-token and queue limits in front of an ASGI app (see the module docstring)."""

    def __init__(self, app, limits: ServerLimits):
        self.app, self.limits = app, limits.check()
        self.generating = 0  # requests inside the app on a generating path (running + waiting)
        self.recent_seconds: list[float] = []  # durations of recent generating requests, for Retry-After

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        try:
            body = await self._read_body(scope, receive)
            generating = scope.get("path", "").rstrip("/") in GENERATING_PATHS
            if generating:
                body = self._bounded_tokens(body)
                if self.generating > self.limits.max_queue:
                    raise _Refused(503, f"the server is busy ({self.generating} requests running or waiting): "
                                        f"retry later", {"Retry-After": str(self._retry_after())})
        except _Refused as exc:
            return await _answer(send, exc.status, exc.message, exc.headers)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the client's disconnect

        scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k != b"content-length"]
                     + [(b"content-length", str(len(body)).encode())])
        if not generating:
            return await self.app(scope, replay, send)
        self.generating += 1
        started = time.monotonic()
        try:
            return await self.app(scope, replay, send)
        finally:
            self.generating -= 1
            self.recent_seconds = (self.recent_seconds + [time.monotonic() - started])[-8:]

    async def _read_body(self, scope, receive) -> bytes:
        limit = self.limits.max_body_bytes
        for key, value in scope.get("headers", []):
            if key == b"content-length" and value.strip().isdigit() and int(value) > limit:
                raise _Refused(413, f"the request body is over {limit} bytes: send a shorter prompt")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Refused(400, "the client closed the connection")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _Refused(413, f"the request body is over {limit} bytes: send a shorter prompt")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _bounded_tokens(self, body: bytes) -> bytes:
        try:
            request = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return body  # the app answers malformed JSON itself (422)
        if not isinstance(request, dict):
            return body
        cap = self.limits.max_new_tokens
        asked = request.get("max_tokens")
        if asked is None:
            request["max_tokens"] = self.limits.default_new_tokens
            return json.dumps(request).encode()
        if isinstance(asked, bool) or not isinstance(asked, int) or not 1 <= asked <= cap:
            raise _Refused(400, f"max_tokens must be an integer from 1 to {cap} on this server")
        return body

    def _retry_after(self) -> int:
        typical = sorted(self.recent_seconds)[len(self.recent_seconds) // 2] if self.recent_seconds else 5.0
        return max(1, math.ceil(typical * max(1, self.generating)))


# -- the server ------------------------------------------------------------------------------------------

def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: a free port), or a one-line error."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise LlamaCppError("--port must be from 0 to 65535")
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise LlamaCppError(f"cannot listen on {host}: {exc.strerror or exc}; pass --host 127.0.0.1") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise LlamaCppError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): pick another --port") from None
    sock.set_inheritable(True)
    return sock


class LlamaServer:
    """llama-cpp-python's server over one GGUF, bound and loaded; :meth:`serve` blocks until
    :meth:`stop` (or SIGINT/SIGTERM in the main thread) and then frees the model."""

    def __init__(self, path: str | Path, host: str = "127.0.0.1", port: int = 8000, n_threads: int = 1,
                 n_ctx: int = 2048, limits: ServerLimits = ServerLimits(), api_key: str | None = None,
                 verbose: bool = False):
        p = _require_gguf(path)
        limits.check()
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 16:
            raise LlamaCppError("--ctx must be an integer of at least 16 tokens")
        if isinstance(n_threads, bool) or not isinstance(n_threads, int) or n_threads < 1:
            raise LlamaCppError("--threads must be a positive integer")
        if os.environ.get("CONFIG_FILE"):
            raise LlamaCppError("CONFIG_FILE is set, and llama-cpp-python's server would load the models it names "
                                "instead: unset CONFIG_FILE")
        self.path, self.limits = p, limits
        self.socket = bind_socket(host, port)
        self.host, self.port = self.socket.getsockname()[:2]
        try:
            self.app = LimitsMiddleware(self._create_app(p, n_threads, n_ctx, api_key), limits)
        except BaseException:
            self.socket.close()
            raise
        import uvicorn

        config = uvicorn.Config(self.app, log_level="info" if verbose else "warning", access_log=verbose,
                                limit_concurrency=limits.max_connections, timeout_graceful_shutdown=5)
        self._server = _quiet_server(config)
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @staticmethod
    def _create_app(path: Path, n_threads: int, n_ctx: int, api_key: str | None):
        from llama_cpp.server.app import create_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings

        # model_construct: no environment variables read, every value is ours
        model = ModelSettings.model_construct(model=str(path), model_alias=path.stem, n_ctx=n_ctx,
                                              n_batch=min(512, n_ctx), n_ubatch=min(512, n_ctx), n_threads=n_threads,
                                              n_threads_batch=n_threads, logits_all=False, verbose=False)
        server = ServerSettings.model_construct(host="127.0.0.1", port=0, api_key=api_key or None,
                                                interrupt_requests=False)
        with _llama_errors() as errors:
            try:
                return create_app(server_settings=server, model_settings=[model])
            except (ValueError, RuntimeError) as exc:
                raise LlamaCppError(f"llama.cpp cannot load {path}: {_last_error(errors, str(exc))}") from None

    def serve(self) -> None:
        try:
            self._server.run(sockets=[self.socket])
        finally:
            self.close()

    def stop(self) -> None:
        self._server.should_exit = True

    def close(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        with contextlib.suppress(OSError):
            self.socket.close()
        import llama_cpp.server.app as server_app

        proxy = getattr(server_app, "_llama_proxy", None)  # the app keeps its model in a module global
        if proxy is not None:
            proxy.free()
            server_app._llama_proxy = None


def _quiet_server(config):
    import uvicorn

    class QuietServer(uvicorn.Server):
        """uvicorn re-raises SIGINT/SIGTERM after its graceful shutdown (SIGINT becomes a
        KeyboardInterrupt); a server stopped on purpose just returns. A second signal forces exit."""

        def handle_exit(self, sig, frame) -> None:
            if self.should_exit:
                self.force_exit = True
            self.should_exit = True

    return QuietServer(config)
