"""Who a profiling worker is, and how long its claims last; no database code (the CLI imports this
to build its ``--help`` without loading SQLAlchemy)."""

from __future__ import annotations

import os
import socket
import uuid

CLAIM_TTL_ENV = "EMPAS_CLAIM_TTL"
DEFAULT_CLAIM_TTL = 180.0  # seconds; renewed every quarter of it: a worker loses its gene after 3 missed renewals


def claim_ttl(seconds: float | None = None) -> float:
    """The claim TTL: ``seconds`` if given, else ``$EMPAS_CLAIM_TTL``, else :data:`DEFAULT_CLAIM_TTL`."""
    if seconds is None:
        text = os.environ.get(CLAIM_TTL_ENV, "").strip()
        try:
            seconds = float(text) if text else DEFAULT_CLAIM_TTL
        except ValueError:
            raise ValueError(f"${CLAIM_TTL_ENV}={text!r} is not a number of seconds: set it to e.g. 180") from None
    if not seconds > 0:  # also refuses nan
        raise ValueError(f"claim TTL {seconds} must be a positive number of seconds (e.g. 180)")
    return float(seconds)


WORKER_NAME_ENV = "EMPAS_WORKER_NAME"


def new_worker_id() -> str:
    """``name:pid:random``, unique per run; the name is ``$EMPAS_WORKER_NAME`` or the host name. With
    the host name, a worker on the same machine sees that the claimer died (:func:`worker_is_dead_here`)
    and takes its gene at once; under another name its claim has to expire first."""
    name = os.environ.get(WORKER_NAME_ENV, "").strip().replace(":", "_")[:80] or socket.gethostname()
    return f"{name}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def worker_is_dead_here(worker: str) -> bool:
    """True when ``worker`` ran on this machine and its process is gone (killed, crashed). A worker of
    another machine, or one whose pid is alive (or reused), is not known to be dead: its claim expires."""
    host, _, rest = worker.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive under another user (EPERM)
        return False
    return False
