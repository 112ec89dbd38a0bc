"""``empas serve`` for a packed checkpoint: a small HTTP endpoint on 127.0.0.1 (POST /generate,
GET /health), one generation at a time, every request checked against limits (:mod:`.http_limits`:
bounded connections and queue, a read deadline, a per-request deadline, generation stopped when the
client leaves)."""

from __future__ import annotations

from dataclasses import asdict
from http import HTTPStatus

from .generation import encode_prompt, generate_text
from .http_limits import (Admission, BoundedHTTPServer, Cancellation, ClientGone, Deadline, LimitedHandler,
                          RequestError, ServeLimits, parse_generate_request)

__all__ = ["InferenceService", "RequestError", "ServeLimits", "make_server", "service_for"]


class InferenceService:
    """A loaded model behind a bounded queue: one generation at a time, requests validated against limits."""

    def __init__(self, model, tokenizer, limits: ServeLimits, info: dict | None = None):
        self.model, self.tokenizer, self.limits, self.info = model, tokenizer, limits.check(), info or {}
        self.admission = Admission(limits.max_queue)

    def parse(self, body: bytes) -> dict:
        return parse_generate_request(body, self.limits)

    def generate(self, request: dict, cancel: Cancellation | None = None) -> dict:
        n_prompt = encode_prompt(self.tokenizer, request["prompt"], request["chat"]).shape[1]
        if n_prompt > self.limits.max_prompt_tokens:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"prompt has {n_prompt} tokens; the limit is {self.limits.max_prompt_tokens}")
        if cancel is None:
            cancel = Cancellation(Deadline(self.limits.request_timeout_s))
        with self.admission.slot(cancel):
            out = generate_text(self.model, self.tokenizer, request["prompt"], request["max_new_tokens"],
                                chat=request["chat"], should_stop=cancel.should_stop)
        if cancel.reason is not None and cancel.reason != "deadline":
            raise ClientGone()
        if cancel.reason == "deadline":
            out["finish_reason"] = "deadline"  # the text so far: the request's time ran out
        return out


class _Handler(LimitedHandler):
    service: InferenceService

    def do_GET(self) -> None:  # noqa: N802
        if self.path.split("?", 1)[0] != "/health":
            return self.send_error_json(HTTPStatus.NOT_FOUND, "unknown path: use GET /health or POST /generate")
        a = self.service.admission
        self.send_json(HTTPStatus.OK, {"status": "ok", "busy": a.busy, "waiting": a.waiting, **self.service.info,
                                       "limits": asdict(self.service.limits)})

    def do_POST(self) -> None:  # noqa: N802
        if self.path.split("?", 1)[0] != "/generate":
            return self.send_error_json(HTTPStatus.NOT_FOUND, "unknown path: use POST /generate")
        try:
            request = self.service.parse(self.read_body())
            result = self.service.generate(request, self.cancellation())
        except RequestError as exc:
            return self.send_error_json(exc.status, exc.message, exc.headers)
        except (ClientGone, TimeoutError, ConnectionError):  # gone, or too slow sending: nobody to answer
            self.close_connection = True
            return
        except Exception as exc:  # a bug or an out-of-memory must not kill the server
            return self.send_error_json(HTTPStatus.INTERNAL_SERVER_ERROR, f"generation failed: {type(exc).__name__}")
        self.send_json(HTTPStatus.OK, result)

    def _not_allowed(self) -> None:
        self.send_error_json(HTTPStatus.METHOD_NOT_ALLOWED, "use GET /health or POST /generate", {"Allow": "GET, POST"})

    do_PUT = do_DELETE = do_PATCH = _not_allowed  # noqa: N815


def make_server(service: InferenceService, host: str = "127.0.0.1", port: int = 0,
                verbose: bool = False) -> BoundedHTTPServer:
    """A bounded threading HTTP server for ``service`` (port 0 picks a free port: ``server.server_address``)."""
    handler = type("EmpasHandler", (_Handler,), {"service": service, "verbose": verbose, "limits": service.limits})
    return BoundedHTTPServer((host, port), handler, service.limits.max_connections)


def service_for(checkpoint, limits: ServeLimits) -> InferenceService:
    m = checkpoint.manifest
    info = {"model": m["model"]["id"], "genes": len(m["genes"]), "average_bits": m["average_bits"],
            "tensor_bytes": m["tensor_bytes"]}
    return InferenceService(checkpoint.model, checkpoint.tokenizer, limits, info)
