"""Helpers shared by the CLI and reliability tests: in-process ``empas`` runs and seeded studies."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent



def run_cli(capsys, *argv):
    """``empas ARGV`` in this process: (exit code, stdout, stderr)."""
    from empas_tui.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err):
    assert code == 2, err
    assert err.startswith("empas: error: ") and err.count("\n") == 1, err


def run_search(settings, profile, storage: str, **kw):
    """The engine's search on the process's :class:`Database` for ``storage`` (a path or URL)."""
    from search.nsga import run_search as engine_run_search
    from storage.database import open_database

    return engine_run_search(settings, profile, open_database(storage), **kw)


def seed_synthetic_study(storage: str, name: str = "s", population: int = 8, blocks: int = 3,
                         granularity: str = "block"):
    """A small EMPAS study (one generation) on a synthetic profile with real SmolLM2 layer shapes."""
    from search.settings import SearchSettings
    from search.synthetic import synthetic_profile

    return run_search(SearchSettings(study_name=name, population=population, trials=population),
                      synthetic_profile(blocks=blocks, granularity=granularity), storage)


def cli_env() -> dict:
    """The environment of an ``empas`` child process: this checkout, one thread, no debug tracebacks."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.pop("EMPAS_DEBUG", None)
    return env


def empas_process(*argv: str, cwd=ROOT, **kw) -> subprocess.Popen:
    """``python -m empas_tui ARGV`` as a child process (for kills, pipes and concurrent workers)."""
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen([sys.executable, "-m", "empas_tui", *argv], cwd=cwd, env=cli_env(), text=True, **kw)
