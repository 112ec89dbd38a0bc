"""SIGINT, SIGTERM and SIGHUP: one path for every command and the TUI.

Closing an SSH session sends SIGHUP, ``kill``, systemd and container runtimes send SIGTERM; both mean
what Ctrl-C means: stop, keep what is finished, tell the user once, exit with the shell's code
(128 + signal: 130, 143, 129). So every command gets the same handler (:func:`installed`):

- a command that can finish its unit in flight (``search``: the generation) says so with
  :func:`graceful`; the first signal then sets its stop event and the second one aborts;
- otherwise the signal raises :class:`Interrupted` (a ``KeyboardInterrupt``) in the main thread: the
  unit in flight is abandoned, and the atomic writers (:mod:`storage.atomic`) remove their temp files
  and folders as the exception unwinds; renames that put a set of files in place finish first
  (``storage.atomic.signals_deferred``);
- ``main`` prints one line and returns :func:`exit_code`.

After SIGHUP the terminal may be gone: a write to it fails (EIO), so messages are best-effort and the
standard streams are pointed at /dev/null once a write fails (Python would otherwise fail flushing
them at exit, with status 120).

``kill -9`` cannot be handled; what it leaves (temp files) is removed by the next writer of the same
target (``storage.atomic.remove_stale_temps``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

from storage.atomic import defer_signal

HANDLED = tuple(s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None))
                if s is not None)
WHAT = {signal.SIGINT: "interrupted", getattr(signal, "SIGTERM", -1): "terminated (SIGTERM)",
        getattr(signal, "SIGHUP", -2): "hung up (SIGHUP: the terminal went away)"}


class Interrupted(KeyboardInterrupt):
    """A handled signal, raised in the main thread; ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _State:
    def __init__(self) -> None:
        self.received: int | None = None  # the first handled signal of this command
        self.stop: threading.Event | None = None  # set by the first signal when the command is graceful
        self.message = ""


_state = _State()


def received() -> int | None:
    """The first signal this command received, if any."""
    return _state.received


def exit_code(signum: int | None = None) -> int:
    """128 + the signal number, what a shell reports for a process the signal stopped (SIGINT: 130)."""
    signum = signum if signum is not None else (_state.received or signal.SIGINT)
    return 128 + int(signum)


def describe(signum: int | None = None) -> str:
    return WHAT.get(signum if signum is not None else (_state.received or signal.SIGINT), "interrupted")


def say(line: str) -> None:
    """One line on stderr, if stderr still works (after SIGHUP it may not)."""
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        silence_standard_streams()


def silence_standard_streams() -> None:
    """Point stdout and stderr at /dev/null (their terminal or reader is gone)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:  # pragma: no cover
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(devnull, stream.fileno())
        except (OSError, ValueError, AttributeError):
            pass
    os.close(devnull)


def _handle(signum: int, frame) -> None:
    if defer_signal(signum):  # a set of renames is in flight: it finishes, then this runs again
        return
    if _state.received is None:
        _state.received = signum
    stop = _state.stop
    if stop is not None and not stop.is_set():
        stop.set()
        if _state.message and signum == signal.SIGINT:  # someone at the keyboard: tell them it is heard
            say(f"\nempas: {_state.message} (Ctrl-C again to abort it)")
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """The handler for SIGINT, SIGTERM and SIGHUP while the block runs (main thread only; the previous
    handlers come back afterwards, so ``main()`` can be called in-process by tests)."""
    with _handling(_handle):
        yield


@contextlib.contextmanager
def _handling(handler) -> Iterator[None]:
    """``handler`` for every handled signal while the block runs, a fresh state, then the old ones."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in HANDLED}
    _state.__init__()
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


@contextlib.contextmanager
def graceful(stop: threading.Event, message: str = "") -> Iterator[threading.Event]:
    """Inside the block the first handled signal sets ``stop`` (the command finishes its unit in flight
    and returns; Ctrl-C also prints ``message`` at once); a second one aborts."""
    _state.stop, _state.message = stop, message
    if _state.received is not None:
        stop.set()
    try:
        yield stop
    finally:
        _state.stop, _state.message = None, ""


@contextlib.contextmanager
def app_exits_on_signals(app) -> Iterator[None]:
    """For the Textual app: a handled signal asks the app to exit with code 128 + N (its screens then
    stop their workers after the unit in flight, as on Ctrl-Q); a second one aborts at once."""
    def handle(signum: int, frame) -> None:
        import asyncio

        if defer_signal(signum):
            return
        if _state.received is not None:
            raise Interrupted(signum)
        _state.received = signum
        try:
            loop = asyncio.get_running_loop()  # the app's loop runs in this (the main) thread
        except RuntimeError:  # not started yet, or already finished
            raise Interrupted(signum) from None
        loop.call_soon_threadsafe(lambda: app.exit(return_code=exit_code(signum)))

    with _handling(handle):
        yield
