"""Atomic writes of files and folders: a temp sibling, fsync, then rename over the target.

A reader (or a crash) never sees a half-written artifact, GGUF file or checkpoint folder: it sees the
old one or the new one. Files get the permissions a plain ``open()`` would give them (``mkstemp``
alone makes them private, 0600).

What an interrupted writer leaves behind is cleaned up by the next writer of the same target:

- temp siblings are named ``.<target name>.tmp-<pid>-<random>`` and their writer holds an exclusive
  ``flock`` on them (the file, or the folder) for as long as it writes; ``kill -9`` releases it. A temp
  is *stale* when nobody holds its lock and its writer's pid is gone (or it is older than
  :data:`STALE_AGE_S`, in case the pid was reused): :func:`remove_stale_temps` deletes only those,
  so two concurrent writers never delete each other's temps;
- a replaced folder is parked in ``.<target>.old-<pid>-*`` during the two renames of a swap; a stale
  one whose target is missing (killed between the renames) is renamed back, never deleted;
- parent folders a failed write created are removed again (no empty output folder is left);
- a handled signal (SIGINT/SIGTERM/SIGHUP, see :func:`defer_signal`) that arrives while a set of files
  is being renamed into place waits until the last rename, so the set is all or nothing;
- a write that fails because the disk is full, over quota, read-only or not writable raises
  :class:`WriteError`, one line that names the fix.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: pid and age decide alone
    fcntl = None

log = logging.getLogger("storage")

STALE_AGE_S = 24 * 3600.0  # an unlocked temp this old is stale even if a process with its pid exists
TEMP_KINDS = ("tmp", "old")


class WriteError(ValueError):
    """A file or folder could not be written (disk full, quota, read-only, permissions); names the fix."""


# -- errors ------------------------------------------------------------------------------------------

WRITE_FIXES = {
    errno.ENOSPC: "the disk is full: free some space or write somewhere else",
    errno.EDQUOT: "the disk quota is used up: free some space or write somewhere else",
    errno.EFBIG: "the file is larger than this file system or the process's file-size limit (ulimit -f) "
                 "allows: raise the limit or write somewhere else",
    errno.EROFS: "the file system is read-only: write somewhere else",
    errno.EACCES: "no permission to write there: fix the folder's permissions or write somewhere else",
    errno.EPERM: "no permission to write there: fix the folder's permissions or write somewhere else",
}
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)|Os \{ code: (\d+)")  # Rust io::Error, e.g. safetensors


def write_errno(exc: BaseException) -> int | None:
    """The errno of a failed write, also from libraries that wrap it in their own error type."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    if isinstance(exc, Exception) and not isinstance(exc, (ValueError, KeyError, TypeError)):
        match = _RUST_OS_ERROR.search(str(exc))
        if match:
            return int(match.group(1) or match.group(2))
    return None


def write_error(target: Path | None, exc: BaseException) -> WriteError | None:
    """``exc`` as a one-line :class:`WriteError` for ``target`` if it is a write failure we can name."""
    code = write_errno(exc)
    if code not in WRITE_FIXES:
        return None
    where = f" {target}" if target is not None else ""
    return WriteError(f"cannot write{where}: {os.strerror(code)}; {WRITE_FIXES[code]}")


# -- signals -----------------------------------------------------------------------------------------

_deferring = 0  # depth of signals_deferred blocks in the main thread
_pending: list[int] = []


def defer_signal(signum: int) -> bool:
    """For signal handlers: True when the main thread is inside :func:`signals_deferred`; the signal is
    then raised again as the block ends (and the handler should return without acting now)."""
    if _deferring > 0:
        _pending.append(signum)
        return True
    return False


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Handled signals wait until the block ends (see :func:`defer_signal`): for the renames that put
    a set of files in place, which must not stop half-way."""
    global _deferring
    if threading.current_thread() is not threading.main_thread():  # handlers only run in the main thread
        yield
        return
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if _deferring == 0 and _pending:
            signum = _pending[-1]
            _pending.clear()
            signal.raise_signal(signum)


# -- temp names and locks ----------------------------------------------------------------------------

def temp_prefix(target: Path, kind: str = "tmp") -> str:
    return f".{target.name}.{kind}-{os.getpid()}-"


def _lock(path: Path, wait: bool = False) -> int | None:
    """Open ``path`` (file or folder) and hold an exclusive flock on it: the fd, to release with
    :func:`_unlock`; None where locks are not supported (no fcntl, some network file systems).
    Without ``wait``, raises BlockingIOError when another process holds it."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:  # ENOLCK and friends: no locks here, pids and ages decide
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def _swapping(folder: Path) -> Iterator[None]:
    """One folder swap at a time in ``folder`` (a lock on the folder itself): two writers replacing
    the same target must not move each other's folders out from under the rename."""
    fd = _lock(folder, wait=True)
    try:
        yield
    finally:
        _unlock(fd)


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the last fd of the open file description releases the flock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<kind>tmp|old)-(?:(?P<pid>\d+)-)?[^/]*$")


def _writer_pid(name: str) -> int | None:
    match = _TEMP_NAME.match(name)
    return int(match.group("pid")) if match and match.group("pid") else None


def _is_stale(path: Path) -> tuple[bool, int | None]:
    """(stale, lock fd held while the caller removes it). Locked by a live writer: not stale."""
    pid = _writer_pid(path.name)
    if pid == os.getpid():
        return False, None  # this process's own (another thread's) temp
    try:
        fd = _lock(path)
    except BlockingIOError:
        return False, None  # its writer is alive and holds it
    except OSError:
        return False, None  # gone already, or unreadable: leave it
    # (fd None: no locks on this file system)
    try:
        age = time.time() - path.lstat().st_mtime
    except OSError:
        _unlock(fd)
        return False, None
    # No lock held: the writer is dead, or it is between creating the temp and locking it (a moment),
    # or this platform has no flock. Its pid decides; without one (older EMPAS names), its age does.
    if pid is not None and _pid_alive(pid) and age < STALE_AGE_S:
        _unlock(fd)
        return False, None
    if pid is None and age < STALE_AGE_S:
        _unlock(fd)
        return False, None
    return True, fd


def remove_stale_temps(target: str | os.PathLike) -> list[Path]:
    """Remove what killed writers of ``target`` left beside it (temp files and folders); restore a
    folder parked by a swap that was killed half-way. Returns what was removed or restored."""
    target = Path(target)
    folder = target.parent
    if not folder.is_dir():
        return []
    done: list[Path] = []
    prefixes = tuple(f".{target.name}.{kind}-" for kind in TEMP_KINDS)
    try:
        names = [n for n in os.listdir(folder) if n.startswith(prefixes)]
    except OSError:
        return []
    for name in sorted(names):
        path = folder / name
        stale, fd = _is_stale(path)
        if not stale:
            continue
        try:
            previous = path / "previous"
            if name.startswith(prefixes[1]) and previous.exists():
                with _swapping(folder):
                    if not target.exists():  # killed between the two renames of a swap: put it back
                        os.replace(previous, target)
                        log.info("restored %s from %s (left by an interrupted write)", target, name)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            done.append(path)
        except OSError:
            continue
        finally:
            _unlock(fd)
    if done:
        log.info("removed %d stale temporary %s left by an interrupted write of %s",
                 len(done), "entry" if len(done) == 1 else "entries", target)
    return done


def _make_parents(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders it created (deepest first) so a failure can undo it."""
    created = []
    p = folder
    while not p.exists():
        created.append(p)
        if p.parent == p:
            break
        p = p.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise (write_error(folder, exc) or exc) from None
    return created


def _remove_created(created: list[Path]) -> None:
    for p in created:  # deepest first; only if still empty
        try:
            p.rmdir()
        except OSError:
            break


def _failed(target: Path, exc: BaseException, created: list[Path]) -> None:
    """Undo the parents a failed write made; raise the one-line WriteError if the failure is one."""
    _remove_created(created)
    err = write_error(target, exc) if isinstance(exc, Exception) else None
    if err is not None:
        raise err from None


# -- permissions and fsync ---------------------------------------------------------------------------

def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def usual_permissions(path: Path) -> None:
    """The mode a plain ``open()`` / ``mkdir`` would have given ``path`` (and, for a folder, its files)."""
    umask = _umask()
    if path.is_dir():
        path.chmod(0o777 & ~umask)
        for p in path.iterdir():
            if p.is_file():
                p.chmod(0o666 & ~umask)
    else:
        path.chmod(0o666 & ~umask)


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_folder(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            _fsync(p)


def _new_temp_file(target: Path) -> tuple[Path, int | None]:
    """A new locked temp file beside ``target``: (path, lock fd). The lock waits: a cleaner may be
    holding it for a moment to look at it (and will leave it: its writer, this process, is alive)."""
    fd, name = tempfile.mkstemp(prefix=temp_prefix(target), dir=target.parent)
    os.close(fd)
    return Path(name), _lock(Path(name), wait=True)


# -- the writers -------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is fsynced and renamed onto ``path``, on any
    failure (or interruption) removed. For files written by a library that wants a path (GGUF)."""
    target = Path(path)
    created = _make_parents(target.parent)
    remove_stale_temps(target)
    tmp, lock = None, None
    try:
        tmp, lock = _new_temp_file(target)
        yield tmp
        _fsync(tmp)
        usual_permissions(tmp)
        with signals_deferred():
            os.replace(tmp, target)
    except BaseException as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        _failed(target, exc, created)
        raise
    finally:
        _unlock(lock)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def move_into_place(tmp: Path, target: Path) -> None:
    """Rename folder ``tmp`` onto ``target`` (replacing an old one only once the new one is there)."""
    with signals_deferred(), _swapping(target.parent):
        if not target.exists() or (target.is_dir() and not any(target.iterdir())):
            os.replace(tmp, target)  # replaces an empty folder atomically on POSIX
            return
        old = Path(tempfile.mkdtemp(prefix=temp_prefix(target, "old"), dir=target.parent))
        lock = _lock(old, wait=True)
        try:
            os.replace(target, old / "previous")
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old / "previous", target)
                raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
            _unlock(lock)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; on success its files are fsynced, given usual permissions
    and the folder renamed onto ``path``; on failure it is removed."""
    target = Path(path)
    created = _make_parents(target.parent)
    remove_stale_temps(target)
    tmp, lock = None, None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target), dir=target.parent))
        lock = _lock(tmp, wait=True)  # a fresh folder: only a cleaner looking at it, for a moment
        yield tmp
        fsync_folder(tmp)
        usual_permissions(tmp)
        move_into_place(tmp, target)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        _failed(target, exc, created)
        raise
    finally:
        _unlock(lock)


@contextlib.contextmanager
def atomic_files(paths: list[str | os.PathLike]) -> Iterator[dict[Path, Path]]:
    """Write several files all or nothing: yield {target: temp path}; once the block returns, every
    temp file is fsynced and renamed onto its target; if the block fails (or is interrupted) no target
    is touched and every temp file is removed. A target that is a folder is refused before anything is
    written (its rename would fail after the others'). Handled signals wait for the renames to finish;
    only a crash (``kill -9``, power loss) between two renames can leave some targets renamed: each of
    them complete, none half-written."""
    targets = [Path(p) for p in paths]
    for target in targets:
        if target.is_dir():
            raise WriteError(f"cannot write {target}: a folder is in the way; move it or write somewhere else")
    temps: dict[Path, Path] = {}
    locks: list[int | None] = []
    created: list[Path] = []
    try:
        for target in targets:
            created += _make_parents(target.parent)
            remove_stale_temps(target)
            temps[target], lock = _new_temp_file(target)
            locks.append(lock)
        yield dict(temps)
        for tmp in temps.values():
            _fsync(tmp)
            usual_permissions(tmp)
        with signals_deferred():
            for target, tmp in temps.items():
                os.replace(tmp, target)
    except BaseException as exc:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        _failed(targets[0] if len(targets) == 1 else targets[0].parent, exc, created)
        raise
    finally:
        for lock in locks:
            _unlock(lock)
