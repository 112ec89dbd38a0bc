"""The ``empas`` command. With no arguments it opens the TUI; subcommands run the same engine headless.

Each command group lives in its own module under ``empas_tui/commands`` and registers itself through
``register(subparsers)``; its handler returns an exit code. Errors the user can fix are raised as
:class:`UserError` (or one of the engine's error types listed in ``USER_ERRORS``) and printed as one
line, ``empas: error: ...``, with exit code 2. Nothing here imports Textual unless the TUI is opened.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

TUI_OPTIONS = ("--storage", "--model")  # `empas --storage X` opens the TUI on that storage

COMMAND_MODULES = [
    "empas_tui.commands.profile",
    "empas_tui.commands.search",
    "empas_tui.commands.deploy",
    "empas_tui.commands.export",
]


class UserError(Exception):
    """An error with a one-line message that names the fix."""


def user_error_types() -> tuple[type[BaseException], ...]:
    from profiling.corpus import CorpusError
    from profiling.inventory import InventoryError
    from profiling.models import ModelLoadError
    from profiling.quantizer import QuantizerError
    from storage.artifacts import ArtifactError
    from storage.urls import StorageError

    return (UserError, CorpusError, InventoryError, ModelLoadError, QuantizerError, ArtifactError,
            StorageError, ValueError)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints usage + error on bad options; EMPAS prints one line that names the fix."""

    def error(self, message: str):
        self.exit(2, f"empas: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="empas",
        description="Find per-layer bit-widths for a causal LM under a memory budget. "
                    "Run without arguments to open the terminal UI.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] == "tui" or argv[0].split("=")[0] in TUI_OPTIONS:
        from empas_tui.app import run_app

        return run_app(argv[1:] if argv and argv[0] == "tui" else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad option (2, message already printed)
        return int(exc.code or 0)
    _log_engine_to_stderr()
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("empas: interrupted; finished work is saved, run the same command again to resume",
              file=sys.stderr)
        return 130
    except user_error_types() as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"empas: error: {message}", file=sys.stderr)
        if os.environ.get("EMPAS_DEBUG"):
            raise
        return 2


def _log_engine_to_stderr() -> None:
    """Engine INFO messages (e.g. the one-off GGUF conversion) as short stderr lines; nothing else."""
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
    for name in ("profiling", "search", "storage"):
        logger = logging.getLogger(name)
        if any(getattr(h, "_empas_cli", False) for h in logger.handlers):
            continue
        handler._empas_cli = True  # type: ignore[attr-defined]
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        logger.propagate = False


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
