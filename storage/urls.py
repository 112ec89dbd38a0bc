"""Storage URLs: one SQLAlchemy URL holds the profiles and the Optuna studies.

Default: ``sqlite:///empas.db`` in the current folder; ``EMPAS_STORAGE`` or ``--storage`` override it
with a path (taken as a SQLite file) or any SQLAlchemy URL, e.g. ``postgresql://user:pw@host/db``.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_STORAGE = "sqlite:///empas.db"
ENV_VAR = "EMPAS_STORAGE"


class StorageError(RuntimeError):
    """The storage cannot be used; the message names the fix."""


def resolve_storage_url(url: str | None = None) -> str:
    url = url or os.environ.get(ENV_VAR) or DEFAULT_STORAGE
    if "://" not in url:  # a plain path: a SQLite file
        url = f"sqlite:///{Path(url).expanduser().resolve()}"
    return url


def redact(url: str) -> str:
    """The URL with any password replaced by ***, for messages and screens."""
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
        if parsed.password:
            return parsed.render_as_string(hide_password=True)
    except Exception:
        pass
    return url


def sqlite_path(url: str) -> Path | None:
    if url.startswith("sqlite:///"):
        rest = url[len("sqlite:///"):]
        return Path(rest) if rest and rest != ":memory:" else None
    return None


def check_reachable(url: str) -> None:
    """Fail early, in one line, if the database cannot be opened (missing folder, server down, bad URL)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

    path = sqlite_path(url)
    if path is not None and not path.parent.is_dir():
        raise StorageError(f"storage folder {path.parent} does not exist: create it or pass another --storage")
    try:
        engine = create_engine(url)
    except (ModuleNotFoundError, NoSuchModuleError) as exc:
        raise StorageError(f"no database driver for {redact(url)} ({exc}): for PostgreSQL run "
                           f"`pip install 'psycopg[binary]'`") from None
    except (ArgumentError, ImportError, ValueError) as exc:
        raise StorageError(f"storage URL {redact(url)} is not valid ({type(exc).__name__}): "
                           f"pass a file path or a SQLAlchemy URL like postgresql://user@host/db") from None
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0] if str(getattr(exc, "orig", exc)).strip() else type(exc).__name__
        raise StorageError(f"cannot open storage {redact(url)}: {reason}; check --storage / {ENV_VAR}") from None
    finally:
        engine.dispose()
