"""The ``empas`` command line: argparse front-end of the job layer (:mod:`empas_tui.jobs`)."""

from .entry import main

__all__ = ["main"]
