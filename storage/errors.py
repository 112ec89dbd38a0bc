"""Database failures as the one-line errors every command prints, with what to do about them.

Apart from :mod:`storage.database` so the table modules (profiles) can raise them without importing
the module that opens databases (which imports them)."""

from __future__ import annotations

import contextlib
from typing import Iterator

from sqlalchemy.exc import SQLAlchemyError

from .urls import StorageError, redact, sqlite_path


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
