"""One database per process: the storage URL resolved once, opened once, shared by every job.

Profiles (EMPAS's own tables) and studies (Optuna's RDB schema) live in the same database. A
:class:`Database` holds the resolved URL and Optuna's ``RDBStorage``, whose SQLAlchemy engine also
serves the profile tables, so one command opens one engine however many steps it runs (profile, then
search, then export), and the TUI reuses it across screens. :func:`open_database` caches them by URL.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterator

from sqlalchemy.exc import SQLAlchemyError

from .urls import ENV_VAR, StorageError, check_reachable, redact, resolve_storage_url, sqlite_path

_OPEN: dict[tuple[int, str], "Database"] = {}
_LOCK = threading.Lock()


def one_line(exc: BaseException) -> str:
    """The first line of a database error's own message (the driver's, when there is one)."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def failure_hint(reason: str, url: str) -> str:
    """What to do about a database failure, from the driver's one-line reason ("" when nothing is known)."""
    low = reason.lower()
    path = sqlite_path(url)
    where = str(path) if path is not None else redact(url)
    if "locked" in low:
        return "another process holds a write lock: wait or stop it"
    if "readonly" in low or "read-only" in low:
        return (f"{where} or its folder is read-only: make both writable (SQLite writes a journal beside the "
                f"file) or pass another --storage" if path is not None else
                "the database refuses writes: check the user's privileges or pass another --storage")
    if "disk is full" in low or "no space" in low or "quota" in low:
        return f"the disk holding {where} is full: free some space or pass another --storage"
    if "malformed" in low or "not a database" in low:
        return recover_hint(url)
    if "disk i/o error" in low:
        return f"the disk holding {where} failed a read or write (full, over quota or failing): check it"
    if "unable to open" in low:
        return f"check that {where} and its folder exist and are readable and writable"
    return ""


def recover_hint(url: str) -> str:
    path = sqlite_path(url)
    if path is None:
        return "restore the database from a backup"
    return (f'recover it with `sqlite3 {path} ".recover" | sqlite3 {path.with_name(path.stem + "-recovered.db")}` '
            f"and pass --storage {path.with_name(path.stem + '-recovered.db')}, or restore a backup")


def storage_error(url: str, exc: BaseException) -> StorageError:
    """A database failure as the one-line error every command prints, with what to do about it."""
    reason = one_line(exc.__cause__ or exc)
    hint = failure_hint(reason, url)
    return StorageError(f"storage {redact(url)} failed: {reason}" + (f"; {hint}" if hint else ""))


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


def is_database_error(exc: BaseException) -> bool:
    """A failure of the database itself (locked, read-only, damaged, gone), as SQLAlchemy or Optuna
    raise it, rather than a bug or a user error."""
    if isinstance(exc, SQLAlchemyError):
        return True
    try:
        import optuna

        return isinstance(exc, optuna.exceptions.StorageInternalError)
    except ImportError:  # pragma: no cover
        return False


@contextlib.contextmanager
def database_errors(url: str) -> Iterator[None]:
    """Turn a database failure inside the block into the one-line :class:`StorageError`."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is the database's
        if is_database_error(exc):
            raise storage_error(url, exc) from None
        raise


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
