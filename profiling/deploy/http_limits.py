"""Limits for a small generation server: what keeps one slow or hostile client from starving the rest.

Shared by every ``empas serve`` backend (the packed-checkpoint server, :mod:`.serve`; a llama.cpp one
can use the same pieces). The model runs one request at a time; around it:

- :class:`BoundedHTTPServer`: at most ``max_connections`` connection threads; one more is answered
  503 at once from the accepting thread (no thread is started for it);
- :class:`LimitedHandler`: the whole request (request line, headers, body) must arrive within
  ``read_timeout_s`` -- a deadline for the request, not a timeout per read, so a client sending one
  byte a second is dropped on time; JSON error bodies; the body read against ``max_body_bytes``;
- :class:`Admission`: a bounded queue in front of the model: a request that finds ``max_queue``
  others waiting gets 503 with ``Retry-After`` (estimated from recent generation times); a request
  that waits past its deadline gets 503 too;
- :class:`Cancellation`: the stopping rule a backend checks between tokens: the request's deadline
  (``request_timeout_s``, counted from its arrival) has passed, or the client has closed its
  connection -- an abandoned request stops generating instead of running to the end;
- :func:`parse_json_object` / :func:`parse_generate_request`: 400 for every malformed body (invalid
  UTF-8, lone surrogates, deep nesting, NaN, duplicate keys, wrong types), 413 for too large.
"""

from __future__ import annotations

import io
import json
import math
import select
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator


@dataclass(frozen=True)
class ServeLimits:
    max_new_tokens: int = 256
    default_new_tokens: int = 64
    max_prompt_chars: int = 8000
    max_prompt_tokens: int = 1024
    max_body_bytes: int = 64 * 1024
    max_queue: int = 4  # requests waiting for the model besides the one it runs
    request_timeout_s: float = 120.0  # arrival to answer: queue wait + generation
    read_timeout_s: float = 30.0  # the whole request must arrive within this
    max_connections: int = 16  # open connections (threads) at once; more are refused with 503

    def check(self) -> "ServeLimits":
        for name in ("max_new_tokens", "default_new_tokens", "max_prompt_chars", "max_prompt_tokens",
                     "max_body_bytes", "max_connections"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be a positive integer")
        if not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise ValueError("max-queue must be 0 or more")
        for name in ("request_timeout_s", "read_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name.replace('_s', '').replace('_', '-')} must be a positive number of seconds")
        return self


class RequestError(Exception):
    """A request answered with ``status`` and a JSON ``{"error": message}`` (plus ``headers``)."""

    def __init__(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class ClientGone(Exception):
    """The client closed its connection: nothing to answer."""


# -- time ----------------------------------------------------------------------------------------------

class Deadline:
    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.end = time.monotonic() + self.seconds

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def expired(self) -> bool:
        return self.remaining() <= 0


def client_gone(sock: socket.socket | None) -> bool:
    """True when the peer has closed the connection (readable with nothing to read, or reset)."""
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):  # reset, or already closed
        return True


class Cancellation:
    """``should_stop()`` for a backend's generation loop (checked between tokens); ``reason`` says why."""

    def __init__(self, deadline: Deadline, sock: socket.socket | None = None):
        self.deadline, self.sock = deadline, sock
        self.reason: str | None = None
        self._next_peek = 0.0

    def should_stop(self) -> bool:
        if self.reason is None and self.deadline.expired():
            self.reason = "deadline"
        now = time.monotonic()
        if self.reason is None and now >= self._next_peek:  # a syscall; a few per second is plenty
            self._next_peek = now + 0.1
            if client_gone(self.sock):
                self.reason = "client closed the connection"
        return self.reason is not None


# -- the queue in front of the model -------------------------------------------------------------------

class Admission:
    """One request runs, at most ``max_queue`` wait (in arrival order); the rest get 503."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._running = False
        self._waiting: list[object] = []
        self._recent: list[float] = []  # seconds of the last generations, for Retry-After

    @property
    def busy(self) -> bool:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: recent generation time x (queue + 1), at least 1."""
        typical = sorted(self._recent)[len(self._recent) // 2] if self._recent else 1.0
        return max(1, math.ceil(typical * (len(self._waiting) + 1)))

    def _busy_error(self, why: str) -> RequestError:
        return RequestError(HTTPStatus.SERVICE_UNAVAILABLE, why, {"Retry-After": str(self.retry_after())})

    @contextmanager
    def slot(self, cancel: Cancellation) -> Iterator[None]:
        """Wait for the model (503 if the queue is full or the deadline passes first; ClientGone if the
        client leaves while waiting), then hold it for the block."""
        ticket = object()
        with self._cond:
            if self._running or self._waiting:
                if len(self._waiting) >= self.max_queue:
                    raise self._busy_error(f"busy: {len(self._waiting)} requests are waiting; retry later")
            self._waiting.append(ticket)
            try:
                while self._running or self._waiting[0] is not ticket:
                    if cancel.should_stop():
                        if cancel.reason == "deadline":
                            raise self._busy_error("busy: the request's deadline passed while it waited")
                        raise ClientGone()
                    self._cond.wait(timeout=min(0.25, max(0.01, cancel.deadline.remaining())))
            finally:
                self._waiting.remove(ticket)
                self._cond.notify_all()
            self._running = True
        started = time.monotonic()
        try:
            yield
        finally:
            with self._cond:
                self._running = False
                self._recent = (self._recent + [time.monotonic() - started])[-16:]
                self._cond.notify_all()


# -- bodies --------------------------------------------------------------------------------------------

def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError("duplicate key")
        out[k] = v
    return out


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def _has_lone_surrogate(value) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def parse_json_object(body: bytes, example: str) -> dict:
    """The body as a JSON object, or 400 naming what is wrong (``example``: a valid body to show)."""
    try:
        data = json.loads(body.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"body is not valid JSON: send {example}") from None
    if not isinstance(data, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"body must be a JSON object: send {example}")
    if _has_lone_surrogate(data):  # "\ud800" is valid JSON but no character: no tokenizer can take it
        raise RequestError(HTTPStatus.BAD_REQUEST, "body has a lone surrogate (\\ud800-\\udfff) that is not a character")
    return data


GENERATE_EXAMPLE = '{"prompt": "...", "max_new_tokens": 64}'


def parse_generate_request(body: bytes, limits: ServeLimits, extra_fields: tuple[str, ...] = ()) -> dict:
    """{prompt, max_new_tokens, chat, **extra} from a POST /generate body, checked against ``limits``."""
    data = parse_json_object(body, GENERATE_EXAMPLE)
    allowed = ("prompt", "max_new_tokens", "chat", *extra_fields)
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"unknown field {unknown[0][:40]!r}: allowed {', '.join(allowed)}")
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError(HTTPStatus.BAD_REQUEST, "\"prompt\" must be a non-empty string")
    if len(prompt) > limits.max_prompt_chars:
        raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"prompt has {len(prompt)} characters; the limit is {limits.max_prompt_chars}")
    n = data.get("max_new_tokens", limits.default_new_tokens)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limits.max_new_tokens:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"\"max_new_tokens\" must be an integer from 1 to {limits.max_new_tokens}")
    chat = data.get("chat", False)
    if not isinstance(chat, bool):
        raise RequestError(HTTPStatus.BAD_REQUEST, "\"chat\" must be true or false")
    return {**{k: data[k] for k in extra_fields if k in data}, "prompt": prompt, "max_new_tokens": n, "chat": chat}


# -- the HTTP layer ------------------------------------------------------------------------------------

class _DeadlineReader(io.RawIOBase):
    """A socket's read side where every read gets only the time left until one deadline."""

    def __init__(self, sock: socket.socket, deadline: Deadline):
        self.sock, self.deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        remaining = self.deadline.remaining()
        if remaining <= 0:
            raise TimeoutError("the request did not arrive in time")
        self.sock.settimeout(remaining)
        return self.sock.recv_into(buffer)


class LimitedHandler(BaseHTTPRequestHandler):
    """Base handler: a deadline for reading the request, JSON replies, the body read within limits.
    Subclasses set ``limits`` and implement ``do_GET`` / ``do_POST``; one request per connection."""

    server_version = "empas"
    protocol_version = "HTTP/1.0"  # one request per connection: the read deadline covers all of it
    limits: ServeLimits = ServeLimits()
    verbose = False

    def setup(self) -> None:
        super().setup()
        self.arrived = Deadline(self.limits.request_timeout_s)
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, Deadline(self.limits.read_timeout_s)))

    def cancellation(self) -> Cancellation:
        """The stopping rule for this request's generation (its deadline, its client)."""
        return Cancellation(self.arrived, self.connection)

    def send_json(self, status: HTTPStatus, payload: dict, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload, allow_nan=False).encode()
        self.connection.settimeout(self.limits.read_timeout_s)  # writing the answer: bounded too
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def send_error_json(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None) -> None:
        self.send_json(status, {"error": message, "status": int(status)}, headers)

    def read_body(self) -> bytes:
        """The request body (Content-Length required, at most ``max_body_bytes``); TimeoutError when
        it does not arrive within the request's read deadline."""
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length header")
        try:
            size = int(length)
            if size < 0:
                raise ValueError
        except ValueError:
            raise RequestError(HTTPStatus.BAD_REQUEST, "invalid Content-Length") from None
        if size > self.limits.max_body_bytes:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"body has {size} bytes; the limit is {self.limits.max_body_bytes}")
        body = self.rfile.read(size)
        if len(body) < size:
            raise ClientGone()
        return body

    def log_message(self, fmt: str, *args) -> None:
        if self.verbose:
            import sys

            sys.stderr.write(f"empas serve: {self.address_string()} {fmt % args}\n")


class BoundedHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server with at most ``max_connections`` connection threads."""

    daemon_threads = True

    def __init__(self, address, handler, max_connections: int):
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request) -> None:
        body = json.dumps({"error": "busy: too many open connections; retry later", "status": 503}).encode()
        try:
            request.settimeout(1.0)
            request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                            b"Retry-After: 1\r\nConnection: close\r\n"
                            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        except OSError:
            pass
        self.shutdown_request(request)
