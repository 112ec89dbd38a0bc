"""A damaged SQLite storage is refused before anything writes to it, in one line that names the fix,
and the file is left byte-for-byte as it was; write failures of the database name their fix too."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from empas_tui.cli import main
from search.nsga import run_search
from search.settings import SearchSettings
from search.synthetic import synthetic_profile
from storage.database import check_integrity, close_all, failure_hint, open_database
from storage.urls import StorageError

ROOT = Path(__file__).resolve().parent.parent


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def two_studies(tmp_path_factory) -> Path:
    """A storage with two small studies (synthetic profiles: no model needed)."""
    path = tmp_path_factory.mktemp("integrity") / "two.db"
    db = open_database(str(path))
    for name in ("a", "b"):
        run_search(SearchSettings(study_name=name, population=10, trials=100),
                   synthetic_profile(blocks=3, granularity="linear", seed=len(name)), db)
    close_all()
    return path


def damaged_copy(src: Path, dst: Path, how: str) -> Path:
    data = bytearray(src.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    else:  # random bytes over a stretch in the middle (a bad sector, a partial copy)
        mid = len(data) // 2
        data[mid:mid + 64 * 1024] = os.urandom(min(64 * 1024, len(data) - mid))
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("how", ["random", "truncated"])
def test_damaged_file_refused_unchanged(two_studies, tmp_path, capsys, how):
    path = damaged_copy(two_studies, tmp_path / "d.db", how)
    before = sha(path)
    for argv in (["search", "--study", "a", "--trials", "10"], ["search", "--study", "b", "--trials", "10"],
                 ["studies"], ["front", "--study", "a"], ["dashboard", "--port", "0"]):
        close_all()
        code = main([*argv, "--storage", str(path)])
        out, err = capsys.readouterr()
        assert code == 2, (argv, err)
        assert err.count("\n") == 1 and err.startswith("empas: error: storage "), err
        assert "damaged" in err and ".recover" in err and "backup" in err, err
        assert sha(path) == before, argv  # not one byte written
        assert not Path(str(path) + "-journal").exists()


def test_not_a_database_is_refused(tmp_path, capsys):
    path = tmp_path / "junk.db"
    path.write_bytes(os.urandom(8192))
    before = sha(path)
    code = main(["studies", "--storage", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "not a SQLite database" in err, err
    assert sha(path) == before


def test_intact_file_passes_and_empty_file_is_a_new_storage(two_studies, tmp_path):
    check_integrity(two_studies)  # no error
    empty = tmp_path / "empty.db"
    empty.touch()
    check_integrity(empty)  # SQLite treats an empty file as an empty database
    close_all()
    assert open_database(str(empty)).optuna is not None
    close_all()


def test_killed_writer_hot_journal_is_rolled_back_not_refused(two_studies, tmp_path):
    """A writer killed mid-transaction leaves a hot journal; the check lets SQLite roll it back (its own
    recovery) instead of calling the file damaged, and the interrupted change is gone."""
    path = tmp_path / "hot.db"
    path.write_bytes(two_studies.read_bytes())
    child = ("import os, sqlite3, sys\n"
             "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
             "c.execute('PRAGMA cache_size=1')\n"  # spill to the file before the commit
             "c.execute('BEGIN')\n"
             "c.execute(\"UPDATE studies SET study_name = study_name || '-renamed'\")\n"
             "c.execute('CREATE TABLE filler(x)')\n"
             "c.executemany('INSERT INTO filler VALUES (?)', [(os.urandom(512),) for _ in range(4000)])\n"
             "os.kill(os.getpid(), 9)\n")
    proc = subprocess.run([sys.executable, "-c", child, str(path)], capture_output=True)
    assert proc.returncode == -9
    journal = Path(str(path) + "-journal")
    assert journal.is_file() and journal.stat().st_size > 0
    check_integrity(path)
    names = {r[0] for r in sqlite3.connect(path).execute("SELECT study_name FROM studies")}
    assert names == {"a", "b"}


def test_failure_hints_name_the_fix():
    url = "sqlite:////data/e.db"
    assert "read-only" in failure_hint("attempt to write a readonly database", url)
    assert "full" in failure_hint("database or disk is full", url)
    assert ".recover" in failure_hint("database disk image is malformed", url)
    assert "lock" in failure_hint("database is locked", url)
    assert failure_hint("something else", url) == ""


def test_quick_check_error_is_one_line(tmp_path):
    path = damaged_copy(Path(__file__).with_name("conftest.py"), tmp_path / "x.db", "truncated")
    with pytest.raises(StorageError) as info:
        check_integrity(path)
    assert "\n" not in str(info.value)
