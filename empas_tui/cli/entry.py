"""The ``empas`` command. With no arguments it opens the TUI; subcommands run the same jobs headless.

Each command group lives in its own module under ``empas_tui/cli`` and registers itself through
``register(subparsers)``; its handler returns an exit code. Errors the user can fix are raised as
:class:`UserError` (or one of the engine's ``ValueError`` / ``StorageError`` types) and printed as one
line, ``empas: error: ...``, with exit code 2. Nothing here imports Textual unless the TUI is opened.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from . import signals

TUI_OPTIONS = ("--storage", "--model")  # `empas --storage X` opens the TUI on that storage

COMMAND_MODULES = [
    "empas_tui.cli.profile",
    "empas_tui.cli.search",
    "empas_tui.cli.deploy",
    "empas_tui.cli.export",
    "empas_tui.cli.evaluate",
]


def user_error_types() -> tuple[type[BaseException], ...]:
    """Every error the engine raises for something the user can fix: ValueError subclasses (bad
    settings, models, corpora, artifacts) and StorageError (databases)."""
    from profiling.models import ModelLoadError
    from storage.urls import StorageError

    return (ValueError, ModelLoadError, StorageError)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints usage + error on bad options; EMPAS prints one line that names the fix."""

    def error(self, message: str):
        self.exit(2, f"empas: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="empas",
        description="Find which quantisation type each weight tensor of a causal LM should get under a size "
                    "budget, and ship it as a GGUF file llama.cpp runs. "
                    "Run without arguments to open the terminal UI.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] == "tui" or argv[0].split("=")[0] in TUI_OPTIONS:
        from empas_tui.tui.app import run_app

        try:
            return run_app(argv[1:] if argv and argv[0] == "tui" else argv)
        except KeyboardInterrupt as exc:  # a signal before the app's loop ran, or a second one
            return _interrupted(getattr(exc, "signum", None))
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad option (2, message already printed)
        return int(exc.code or 0)
    _log_engine_to_stderr()
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    with signals.installed():
        return _run(args)


def _run(args) -> int:
    """Run a command's handler; every way it can end becomes an exit code and at most one line."""
    try:
        return int(args.handler(args) or 0)
    except BrokenPipeError:
        return _closed_pipe()
    except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM, SIGHUP (signals.Interrupted)
        return _interrupted(getattr(exc, "signum", None))
    except cancellation_types():  # a job stopped by the signal handler's stop event
        return _interrupted(signals.received())
    except user_error_types() as exc:
        return _user_error(exc)
    except OSError as exc:
        if signals.received() is not None:  # after SIGHUP: the terminal is gone, writing to it failed
            signals.silence_standard_streams()
            return signals.exit_code()
        from storage.atomic import write_error

        err = write_error(Path(exc.filename) if getattr(exc, "filename", None) else None, exc)
        if err is None:
            raise
        return _user_error(err)
    except Exception as exc:
        from storage.database import as_storage_error

        err = as_storage_error(exc)  # a database failure no job turned into its one line
        if err is None:
            raise
        return _user_error(err)


CANCELLATIONS = (("profiling.sensitivity", "ProfileCancelled"), ("profiling.evaluation", "ValidationCancelled"))


def cancellation_types() -> tuple[type[BaseException], ...]:
    """The engine's "stopped by should_stop" errors, from the modules already imported (only those can
    have raised them; importing the others would cost seconds of torch start-up)."""
    return tuple(getattr(sys.modules[m], name) for m, name in CANCELLATIONS if m in sys.modules)


def _interrupted(signum: int | None) -> int:
    signum = signum or signals.received()
    signals.say(f"empas: {signals.describe(signum)}; finished work is saved and nothing is half-written: "
                f"run the same command again to continue")
    return signals.exit_code(signum)


def _user_error(exc: BaseException) -> int:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    signals.say(f"empas: error: {message}")
    if os.environ.get("EMPAS_DEBUG"):
        raise exc
    return 2


def _closed_pipe() -> int:
    """The reader of stdout went away (``empas front | head -3``): stop quietly, as Unix tools do.

    Python would print a BrokenPipeError traceback while flushing stdout at exit; pointing stdout at
    /dev/null first lets it exit cleanly."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141  # 128 + SIGPIPE, what a shell reports for a writer killed by a closed pipe


def _log_engine_to_stderr() -> None:
    """Engine and job INFO messages (e.g. the one-off GGUF conversion) as short stderr lines; nothing else."""
    import logging

    class CurrentStderrHandler(logging.StreamHandler):
        """Writes to whatever sys.stderr is now (tests and the TUI swap it), not the one at start."""

        @property
        def stream(self):
            return sys.stderr

        @stream.setter
        def stream(self, _value):
            pass

    handler = CurrentStderrHandler()
    handler.setFormatter(logging.Formatter("empas: %(message)s"))
    for name in ("profiling", "search", "storage", "empas_tui.jobs"):
        logger = logging.getLogger(name)
        if any(getattr(h, "_empas_cli", False) for h in logger.handlers):
            continue
        handler._empas_cli = True  # type: ignore[attr-defined]
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        logger.propagate = False


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
