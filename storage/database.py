"""One database per process: the storage URL resolved once, opened once, shared by every job.

Profiles (EMPAS's own tables) and studies (Optuna's RDB schema) live in the same database. A
:class:`Database` holds the resolved URL and Optuna's ``RDBStorage``, whose SQLAlchemy engine also
serves the profile tables, so one command opens one engine however many steps it runs (profile, then
search, then export), and the TUI reuses it across screens. :func:`open_database` caches them by URL.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from .errors import database_errors, failure_hint, is_database_error, one_line, recover_hint, storage_error  # noqa: F401
from .urls import ENV_VAR, StorageError, check_reachable, redact, resolve_storage_url, sqlite_path

_OPEN: dict[tuple[int, str], "Database"] = {}
_LOCK = threading.Lock()


def open_urls() -> list[str]:
    """The storage URLs this process has opened (to name the storage in a late failure)."""
    with _LOCK:
        return [url for (pid, url) in _OPEN if pid == os.getpid()]


def as_storage_error(exc: BaseException) -> StorageError | None:
    """``exc`` as the one-line :class:`StorageError` if it is a database failure, else None; for the
    commands' last line of defence, where the URL is the one storage the process opened."""
    if isinstance(exc, StorageError):
        return exc
    if not is_database_error(exc):
        return None
    urls = open_urls()
    return storage_error(urls[0] if len(urls) == 1 else "(storage)", exc)


class Database:
    """An opened storage: ``url`` (resolved), ``optuna`` (the RDBStorage), ``engine`` and ``profiles``."""

    def __init__(self, url: str, optuna_storage):
        self.url = url
        self.optuna = optuna_storage
        self._profiles = None
        self._lock = threading.Lock()

    @property
    def engine(self):
        return self.optuna.engine

    @property
    def redacted(self) -> str:
        return redact(self.url)

    @property
    def profiles(self):
        """The profile tables (created on first use)."""
        with self._lock:
            if self._profiles is None:
                from .profiles import ProfileStore

                self._profiles = ProfileStore(self)
            return self._profiles

    def close(self) -> None:
        with _LOCK:
            _OPEN.pop((os.getpid(), self.url), None)
        self.engine.dispose()


def open_database(url: str | None = None, create: bool = True) -> Database:
    """The process's :class:`Database` for ``url`` (``--storage``, ``$EMPAS_STORAGE``, ``./empas.db``).

    Fails in one line (:class:`StorageError`) when the database cannot be reached, a SQLite file is
    damaged (:func:`check_integrity`) or its schema is not Optuna's; nothing is written to a database
    that cannot be opened. ``create=False`` (commands that only read) refuses a SQLite file that does
    not exist instead of creating an empty one."""
    resolved = resolve_storage_url(url)
    path = sqlite_path(resolved)
    if not create and path is not None and not path.is_file():
        raise StorageError(f"no storage at {path}: run `empas search` first, or pass --storage / ${ENV_VAR}")
    key = (os.getpid(), resolved)
    with _LOCK:
        db = _OPEN.get(key)
        if db is None:
            check_storage(resolved)
            db = _OPEN[key] = Database(resolved, _open_rdb(resolved))
    return db


_CHECKED: dict[Path, tuple] = {}  # SQLite files this process found intact, and their (size, mtime, inode) then


def check_storage(url: str) -> None:
    """Everything :func:`open_database` checks before it opens (and may write to) a storage: it is
    reachable, and a SQLite file is not damaged. For clients that open it later (the TUI); a file
    checked by this process and unchanged since is not read again."""
    path = sqlite_path(url)
    if path is not None and path.is_file():
        st = path.stat()
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
        if _CHECKED.get(path) != stamp:
            check_integrity(path, url)
            _CHECKED[path] = stamp
    check_reachable(url)


def check_integrity(path: Path, url: str | None = None) -> None:
    """Refuse a damaged SQLite file before anything writes to it: ``PRAGMA quick_check`` (every page
    of every table and index read and checked, without the slower index-to-table cross-check of
    ``integrity_check``), on a read-only connection, so the file is left byte-for-byte as it was.

    A write into a damaged file can spread the damage (SQLite reuses free pages it cannot read
    correctly); refusing costs one sequential read of the file (docs/reliability.md: the measured cost)."""
    url = url or f"sqlite:///{path}"
    journal = path.with_name(path.name + "-journal")
    # A hot journal (a writer killed mid-transaction) must be rolled back by a writable connection
    # before the file can be read consistently; that rollback is SQLite's own recovery.
    mode = "rw" if journal.is_file() and journal.stat().st_size > 0 else "ro"
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode={mode}", uri=True,
                               timeout=float(os.environ.get("EMPAS_SQLITE_TIMEOUT", 30)))
    except sqlite3.Error as exc:
        raise StorageError(f"cannot read storage {path}: {one_line(exc)}; {failure_hint(one_line(exc), url)}"
                           .rstrip("; ")) from None
    try:
        rows = conn.execute("PRAGMA quick_check(3)").fetchall()
    except sqlite3.Error as exc:
        reason = one_line(exc)
        if not any(k in reason.lower() for k in ("malformed", "not a database", "corrupt")):
            hint = failure_hint(reason, url)  # locked, read-only (a hot journal it cannot roll back), ...
            raise StorageError(f"cannot check storage {path}: {reason}" + (f"; {hint}" if hint else "")) from None
        rows = [(reason,)]
    finally:
        conn.close()
    problems = [line.strip() for r in rows if r and r[0] != "ok" for line in str(r[0]).splitlines()
                if line.strip() and not line.startswith("*** in database")]
    if problems and "not a database" in problems[0]:
        raise StorageError(f"storage {path} is not a SQLite database (or its header is damaged): pass another "
                           f"--storage, or restore it from a backup; nothing was written to it")
    if problems:
        raise StorageError(f"storage {path} is damaged (quick_check: {problems[0][:120]}); {recover_hint(url)}; "
                           f"nothing was written to it")


def _open_rdb(url: str, sqlite_timeout: float | None = None):
    """An Optuna ``RDBStorage`` for ``url`` (tables created if missing), or one-line ``StorageError``."""
    import optuna

    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        timeout = sqlite_timeout if sqlite_timeout is not None else float(os.environ.get("EMPAS_SQLITE_TIMEOUT", 30))
        kwargs = {"connect_args": {"timeout": timeout}}
    reason = "unknown error"
    for attempt in range(4):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except RuntimeError as exc:  # schema of another Optuna version
            raise StorageError(f"{redact(url)}: {one_line(exc)}") from None
        except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
            reason = one_line(exc.__cause__ or exc)
            # Several workers opening a new, empty database race to create Optuna's tables and its
            # alembic_version row; the losers fail on a unique key / existing table. By the next try
            # the schema is there.
            if attempt < 3 and any(k in reason.lower() for k in ("unique", "already exists", "duplicate")):
                import time

                time.sleep(0.2 * (attempt + 1))
                continue
            break
    hint = failure_hint(reason, url)
    raise StorageError(f"cannot use storage {redact(url)}: {reason}" + (f"; {hint}" if hint else "")) from None


def close_all() -> None:
    """Dispose of every engine this process opened (tests, and the end of the TUI)."""
    with _LOCK:
        dbs = list(_OPEN.values())
        _OPEN.clear()
    for db in dbs:
        db.engine.dispose()
