"""Atomic writers: what a killed writer leaves is removed by the next writer of the same target, never
what a live writer is using; failed writes leave no empty folder and fail in one line; handled signals
wait for a set of renames to finish."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage.atomic import (WriteError, atomic_files, atomic_folder, atomic_write_text, defer_signal,
                            remove_stale_temps, signals_deferred, write_error)

ROOT = Path(__file__).resolve().parent.parent


def child(code: str, *args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has it (until the kernel reuses it, which takes a while)


def test_kill_9_leftovers_removed_by_next_write(tmp_path):
    """A writer killed inside atomic_folder / atomic_file leaves its temp; the next write of the same
    target removes it (and only temps of that target)."""
    code = ("import os, sys, time\n"
            "from pathlib import Path\n"
            "from storage.atomic import atomic_folder, atomic_file\n"
            "out = Path(sys.argv[1])\n"
            "with atomic_folder(out / 'ckpt') as tmp:\n"
            "    (tmp / 'weights').write_bytes(b'x' * 100000)\n"
            "    with atomic_file(out / 'a.json') as f:\n"
            "        f.write_text('half')\n"
            "        print('writing', flush=True)\n"
            "        time.sleep(60)\n")
    proc = child(code, str(tmp_path))
    assert proc.stdout.readline() == "writing\n"
    proc.kill()
    proc.wait()
    left = hidden(tmp_path)
    assert len(left) == 2 and all(f".tmp-{proc.pid}-" in n for n in left), left
    (tmp_path / ".other.json.tmp-1-x").write_text("not ours")
    atomic_write_text(tmp_path / "a.json", "{}")
    assert [n for n in hidden(tmp_path) if n.startswith(".a.json")] == []
    with atomic_folder(tmp_path / "ckpt") as tmp:
        (tmp / "weights").write_bytes(b"y")
    assert hidden(tmp_path) == [".other.json.tmp-1-x"]  # another target's temp is not touched
    assert (tmp_path / "ckpt" / "weights").read_bytes() == b"y"


def test_live_writers_temps_are_never_removed(tmp_path):
    """Two processes write the same targets over and over, each cleaning stale temps first: neither
    ever loses its temp to the other (which would fail its rename), and every result is complete."""
    code = ("import json, sys\n"
            "from pathlib import Path\n"
            "from storage.atomic import atomic_files, atomic_folder\n"
            "out = Path(sys.argv[1]); me = sys.argv[2]\n"
            "for i in range(150):\n"
            "    with atomic_files([out / 'x.json', out / 'y.json']) as t:\n"
            "        for p in t.values():\n"
            "            p.write_text(json.dumps({'w': me, 'i': i, 'pad': 'p' * 20000}))\n"
            "    with atomic_folder(out / 'ck') as d:\n"
            "        (d / 'f').write_text(me)\n"
            "print('ok', flush=True)\n")
    procs = [child(code, str(tmp_path), str(w)) for w in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0 and out == "ok\n", err
    for name in ("x.json", "y.json"):
        assert len(json.loads((tmp_path / name).read_text())["pad"]) == 20000
    assert (tmp_path / "ck" / "f").read_text() in ("0", "1")
    assert hidden(tmp_path) == []


def test_stale_rules(tmp_path):
    target = tmp_path / "a.json"
    dead = tmp_path / f".a.json.tmp-{dead_pid()}-x"
    dead.write_text("dead writer")
    alive_unlocked = tmp_path / f".a.json.tmp-{os.getppid()}-x"  # a live pid, between create and lock
    alive_unlocked.write_text("?")
    old_style_new = tmp_path / ".a.json.tmp-abcdef"  # no pid (older EMPAS): its age decides
    old_style_new.write_text("?")
    old_style_old = tmp_path / ".a.json.tmp-ghijkl"
    old_style_old.write_text("?")
    os.utime(old_style_old, (time.time() - 3 * 86400,) * 2)
    removed = {p.name for p in remove_stale_temps(target)}
    assert removed == {dead.name, old_style_old.name}
    assert alive_unlocked.exists() and old_style_new.exists()


def test_swap_killed_between_renames_restores_the_previous_folder(tmp_path):
    parked = tmp_path / f".ckpt.old-{dead_pid()}-x"
    (parked / "previous").mkdir(parents=True)
    (parked / "previous" / "weights").write_text("the only copy")
    remove_stale_temps(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "weights").read_text() == "the only copy"
    assert hidden(tmp_path) == []


FULL_DISK = ("import resource, signal, sys\n"
             "from pathlib import Path\n"
             "from storage.atomic import atomic_files, atomic_folder, WriteError\n"
             "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"  # the write fails with EFBIG instead
             "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))\n"
             "out = Path(sys.argv[1]) / 'new' / 'folder'\n"
             "try:\n"
             "    with atomic_files([out / 'a.json', out / 'b.json', out / 'c.json']) as t:\n"
             "        for i, p in enumerate(t.values()):\n"
             "            p.write_bytes(b'x' * (1000 if i < 2 else 10000))\n"
             "except WriteError as e:\n"
             "    print(e)\n"
             "try:\n"
             "    with atomic_folder(out / 'ckpt') as d:\n"
             "        (d / 'w').write_bytes(b'x' * 10000)\n"
             "except WriteError as e:\n"
             "    print(e)\n")


def test_full_disk_all_or_nothing_without_empty_folders(tmp_path):
    proc = child(FULL_DISK, str(tmp_path))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 and all("File too large" in line and "ulimit" in line for line in lines), out
    assert list(tmp_path.iterdir()) == []  # no artifact, no temp, not even the folders it made


def test_write_error_reads_wrapped_os_errors(tmp_path):
    class SafetensorError(Exception):
        pass

    err = write_error(tmp_path, SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                                'message: "No space left on device" })'))
    assert isinstance(err, WriteError) and "No space left" in str(err) and "free some space" in str(err)
    assert write_error(tmp_path, OSError(28, "No space left on device")) is not None
    assert write_error(tmp_path, ValueError("code: 28")) is None
    assert write_error(tmp_path, OSError(2, "No such file")) is None


def test_read_only_folder_is_one_line(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; tests/test_faults.py uses a read-only mount")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(WriteError, match="permission"):
            atomic_write_text(folder / "a.json", "{}")
    finally:
        folder.chmod(0o755)


def test_handled_signal_waits_for_the_renames():
    seen = []

    def handler(signum, frame):
        if defer_signal(signum):
            return
        seen.append(("handled", signum))

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        with signals_deferred():
            signal.raise_signal(signal.SIGUSR1)
            seen.append("renames done")
        assert seen == ["renames done", ("handled", signal.SIGUSR1)]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_interrupted_block_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_files([tmp_path / "out" / "a.json", tmp_path / "out" / "b.json"]) as temps:
            for p in temps.values():
                p.write_text("x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
