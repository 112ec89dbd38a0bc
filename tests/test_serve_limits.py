"""`empas serve` limits on a real (tiny) Llama and real sockets: malformed bodies are 400, the queue and
the connection count are bounded (503 + Retry-After), a slow client is dropped at the read deadline
(not per read), a request's deadline cuts its generation, and a client that leaves stops its
generation between tokens."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest

from conftest import TinyTokenizer, make_tiny_llama
from profiling.deploy.http_limits import Admission, Cancellation, Deadline, RequestError, ServeLimits
from profiling.deploy.serve import InferenceService, make_server

SLOW_STEP_S = 0.05  # a forward pass of the "slow hardware" model: tokens arrive at 20/s


class Served:
    def __init__(self, limits: ServeLimits, slow: bool = False):
        self.model = make_tiny_llama()
        self.forwards = 0

        def count(module, args):
            self.forwards += 1
            if slow:
                time.sleep(SLOW_STEP_S)

        self.model.register_forward_pre_hook(count)
        self.server = make_server(InferenceService(self.model, TinyTokenizer(), limits, {"model": "tiny"}))
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def serve():
    made = []

    def start(slow=False, **kw):
        base = dict(max_new_tokens=400, default_new_tokens=4, max_prompt_chars=200, max_prompt_tokens=200,
                    max_body_bytes=64 * 1024)
        made.append(Served(ServeLimits(**{**base, **kw}), slow))
        return made[-1]

    yield start
    for s in made:
        s.close()


def post(port, body, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request("POST", "/generate", body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null"), dict(resp.getheaders())
    finally:
        conn.close()


def raw_post(body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (b"POST /generate HTTP/1.0\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)


def test_every_malformed_body_is_400(serve):
    s = serve()
    deep = b'{"prompt": ' + b"[" * 30000 + b"]" * 30000 + b"}"
    bad = [
        deep,  # deeper than any parser's stack
        b'{"prompt": "\\ud800"}',  # a lone surrogate: valid JSON, no character
        b'{"prompt": "a\\udc00b"}',
        b'{"\\ud800": 1, "prompt": "x"}',
        b'{"prompt": "\xff\xfe"}',  # not UTF-8
        b'{"prompt": "x", "max_new_tokens": NaN}',
        b'{"prompt": "x", "prompt": "y"}',  # duplicate key
        b'{"prompt": 5}', b'{"prompt": ["x"]}', b'{"prompt": null}', b'{"prompt": {"a": "b"}}',
        b'{"prompt": "x", "max_new_tokens": 1.5}', b'{"prompt": "x", "max_new_tokens": true}',
        b'{"prompt": "x", "max_new_tokens": "3"}', b'{"prompt": "x", "max_new_tokens": 1e400}',
        b'{"prompt": "x", "max_new_tokens": ' + b"9" * 5000 + b"}",
        b'{"prompt": "x", "chat": "yes"}', b'"just a string"', b"[]", b"", b"{",
    ]
    for body in bad:
        status, payload, _ = post(s.port, body)
        assert status == 400, (body[:60], status, payload)
        assert isinstance(payload["error"], str) and payload["status"] == 400
    assert post(s.port, {"prompt": "still serving", "max_new_tokens": 2})[0] == 200


def test_slow_client_is_dropped_at_the_read_deadline(serve):
    s = serve(read_timeout_s=1.0)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", s.port), timeout=30) as sock:
        request = raw_post({"prompt": "hi"})
        closed_after = None
        for byte in request:  # 1 byte every 0.2 s: each read is quick, the whole would take ~20 s
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed_after = time.monotonic() - started
                break
            time.sleep(0.2)
            sock.settimeout(0.01)
            try:
                if sock.recv(1024) == b"":
                    closed_after = time.monotonic() - started
                    break
            except (TimeoutError, BlockingIOError):
                pass
            except OSError:
                closed_after = time.monotonic() - started
                break
    assert closed_after is not None and closed_after < 3.0, closed_after
    assert post(s.port, {"prompt": "ok", "max_new_tokens": 2})[0] == 200


def test_queue_is_bounded_with_retry_after(serve):
    s = serve(slow=True, max_queue=1)
    results = {}

    def client(name, n):
        results[name] = post(s.port, {"prompt": "hello", "max_new_tokens": n})

    running = threading.Thread(target=client, args=("running", 30))
    running.start()
    time.sleep(0.5)
    waiting = threading.Thread(target=client, args=("waiting", 2))
    waiting.start()
    time.sleep(0.3)
    status, payload, headers = post(s.port, {"prompt": "one too many", "max_new_tokens": 2})
    assert status == 503 and "waiting" in payload["error"]
    assert int(headers["Retry-After"]) >= 1
    running.join(60)
    waiting.join(60)
    assert results["running"][0] == 200 and results["waiting"][0] == 200  # the admitted ones are served


def test_connections_are_bounded(serve):
    s = serve(max_connections=2, read_timeout_s=2.0)
    idle = [socket.create_connection(("127.0.0.1", s.port), timeout=30) for _ in range(2)]
    try:
        time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", s.port), timeout=30) as third:
            reply = third.recv(4096)
        assert reply.startswith(b"HTTP/1.0 503") and b"Retry-After" in reply
    finally:
        for sock in idle:
            sock.close()
    time.sleep(2.5)  # the idle ones hit their read deadline; their threads end
    assert post(s.port, {"prompt": "ok", "max_new_tokens": 2})[0] == 200


def test_request_deadline_cuts_generation(serve):
    s = serve(slow=True, request_timeout_s=1.0)
    started = time.monotonic()
    status, payload, _ = post(s.port, {"prompt": "hello", "max_new_tokens": 400})
    took = time.monotonic() - started
    assert status == 200 and payload["finish_reason"] == "deadline"
    assert 0 < payload["new_tokens"] < 400 and took < 3.0, (payload["new_tokens"], took)


def test_client_that_leaves_stops_its_generation(serve):
    s = serve(slow=True)
    sock = socket.create_connection(("127.0.0.1", s.port), timeout=30)
    sock.sendall(raw_post({"prompt": "hello", "max_new_tokens": 400}))  # ~20 s of generation
    time.sleep(1.0)
    assert s.forwards > 3
    sock.close()
    time.sleep(1.0)  # a token or two in flight, then the criterion sees the closed socket
    after_close = s.forwards
    time.sleep(1.0)
    assert s.forwards == after_close, "generation went on for a client that left"
    assert after_close < 80
    # the model is free again at once
    status, payload, _ = post(s.port, {"prompt": "next", "max_new_tokens": 2})
    assert status == 200 and payload["new_tokens"] >= 1


def test_deadline_passing_in_the_queue_is_503():
    admission = Admission(max_queue=2)
    hold = Cancellation(Deadline(30))
    with admission.slot(hold):
        waiter = Cancellation(Deadline(0.3))
        started = time.monotonic()
        with pytest.raises(RequestError) as info:
            with admission.slot(waiter):
                pass
        assert info.value.status == 503 and "Retry-After" in info.value.headers
        assert time.monotonic() - started < 2.0
    assert not admission.busy and admission.waiting == 0


def test_limits_are_checked():
    with pytest.raises(ValueError, match="max-queue"):
        ServeLimits(max_queue=-1).check()
    with pytest.raises(ValueError, match="request-timeout"):
        ServeLimits(request_timeout_s=float("nan")).check()
