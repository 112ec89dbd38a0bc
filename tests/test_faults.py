"""Fault injection: signals, damaged / read-only / full storage and full output disks, against the real
commands as real processes (tests/fault_harness.py forks them from a preloaded zygote).

For every case the test records: the exit code, the lines on stderr, whether the data is intact, and
the temp files left; then, where there is something to resume or clean up, it runs the same command
again and checks that it finishes with the same result and removes what a killed run left. The
counts go to docs/reliability.md (``EMPAS_RELIABILITY_REPORT=path`` appends them as JSON lines).

Small on purpose (the whole suite must fit 15 minutes on 2 cores): the tiny random Llama folder, RTN
profiles of 64 calibration tokens, studies of a few generations of 10.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from fault_harness import (Pty, Zygote, after_terminal_reset, can_mount, fill, hidden_temps, record,
                           remount_read_only, small_tmpfs)

P = 10  # population of the test studies
SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGHUP": signal.SIGHUP, "kill -9": signal.SIGKILL}
MOUNT = can_mount() and not os.environ.get("EMPAS_FAULTS_NO_MOUNT")  # the fallback can be tried
ROOT_USER = os.geteuid() == 0


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stderr_lines(text: str) -> list[str]:
    return [line for line in text.replace("\r", "\n").split("\n") if line.strip()]


def query(db: Path, sql: str):
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def wait_until(condition, timeout: float = 120, every: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if condition():
                return True
        except sqlite3.Error:  # a table not created yet, or locked for a moment
            pass
        time.sleep(every)
    return False


# -- the shared world: a zygote, a tiny model's study and artifacts, a synthetic study ---------------------

@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


@pytest.fixture(autouse=True)
def no_run_outlives_its_test(request):
    yield
    if "zygote" in request.fixturenames:
        request.getfixturevalue("zygote").reap()


def profile_argv(model: Path, db: Path) -> list[str]:
    return ["profile", "--model", str(model), "--storage", str(db), "--quantizer", "rtn", "--bits", "2,3,4,8,16",
            "--granularity", "linear", "--calib-tokens", "64", "--seq-len", "32", "--json"]


@pytest.fixture(scope="module")
def world(zygote, tiny_model_dir, tmp_path_factory):
    from search.nsga import run_search
    from search.settings import SearchSettings
    from search.synthetic import synthetic_profile
    from storage.database import close_all, open_database

    base = tmp_path_factory.mktemp("faults")
    synthetic = base / "synthetic.db"
    run_search(SearchSettings(study_name="a", population=P, trials=5 * P),
               synthetic_profile(blocks=3, granularity="linear"), open_database(str(synthetic)))
    close_all()
    tiny = base / "tiny.db"
    run = zygote.start(["search", "--model", str(tiny_model_dir), "--storage", str(tiny), "--study", "tiny",
                        "--quantizer", "rtn", "--bits", "2,4,16", "--granularity", "linear", "--calib-tokens", "64",
                        "--heldout-tokens", "64", "--seq-len", "32", "--trials", str(4 * P), "--population", str(P),
                        "--json"], base)
    assert run.wait() == 0, run.stderr
    arts = base / "arts"
    run = zygote.start(["export", "--study", "tiny", "--storage", str(tiny), "-o", str(arts)], base)
    assert run.wait() == 0, run.stderr
    reference = base / "reference.db"
    run = zygote.start(profile_argv(tiny_model_dir, reference), base)
    assert run.wait() == 0, run.stderr
    return SimpleNamespace(base=base, model=tiny_model_dir, synthetic=synthetic, tiny=tiny, arts=arts,
                           artifact=arts / "balanced.json", reference_profile=json.loads(run.stdout)["S"])


# -- signals x commands ----------------------------------------------------------------------------------

PAUSE_IN_WRITE = {"module": "storage.atomic", "function": "_fsync", "seconds": 60}  # temps written, not renamed


class Case:
    """How to run one command, tell that it is in flight, check its data, and resume it."""

    name = ""
    pause: dict | None = None  # where the command is held while the signal comes

    def __init__(self, world, tmp: Path):
        self.world, self.tmp = world, tmp

    def argv(self) -> list[str]:
        raise NotImplementedError

    def in_flight(self) -> bool:
        return (self.tmp / "paused").exists()

    def intact(self) -> bool:
        raise NotImplementedError

    def temps(self) -> list[str]:
        return hidden_temps(self.tmp)

    def resumed(self, run) -> bool:
        raise NotImplementedError


class ProfileCase(Case):
    name = "profile"
    # the first gene is committed, the second measured and about to be: the signal comes then
    pause = {"module": "storage.profiles", "function": "ProfileStore.add_entries", "after": 1, "seconds": 60}

    def __init__(self, world, tmp):
        super().__init__(world, tmp)
        self.db = tmp / "p.db"

    def argv(self):
        return profile_argv(self.world.model, self.db)

    def cells(self) -> dict[int, int]:
        return dict(query(self.db, "SELECT gene_index, count(*) FROM empas_profile_cells GROUP BY gene_index"))

    def intact(self):
        """Genes are committed whole: every stored gene has all its qtypes."""
        if not self.db.exists():
            return True
        try:
            counts = set(self.cells().values())
        except sqlite3.OperationalError:  # killed before the tables existed
            return True
        return len(counts) <= 1

    def resumed(self, run):
        out = json.loads(run.stdout)
        return out["reused_entries"] > 0 and out["S"] == self.world.reference_profile


class SearchCase(Case):
    name = "search"

    def __init__(self, world, tmp):
        super().__init__(world, tmp)
        self.db = tmp / "s.db"
        shutil.copy(world.synthetic, self.db)
        self.before = self.trials()

    def trials(self) -> int:
        return query(self.db, "SELECT count(*) FROM trials")[0][0]

    def argv(self, trials: int = 100_000_000):
        return ["search", "--study", "a", "--storage", str(self.db), "--trials", str(trials), "--json"]

    def in_flight(self):
        return self.trials() > self.before

    def intact(self):
        states = dict(query(self.db, "SELECT state, count(*) FROM trials GROUP BY state"))
        numbers = [n for (n,) in query(self.db, "SELECT number FROM trials ORDER BY number")]
        return (set(states) == {"COMPLETE"} and numbers == list(range(len(numbers)))
                and (len(numbers) - self.before) % P == 0)  # whole generations only

    def resume_argv(self):
        return self.argv(2 * P)

    def resumed(self, run):
        out = json.loads(run.stdout)
        gens = query(self.db, "SELECT count(DISTINCT value_json) FROM trial_system_attributes "
                              "WHERE key = 'NSGAIISampler:generation'")[0][0]
        return out["trials_run"] == 2 * P and out["last_generation"] == gens - 1 and self.intact()


class ExportCase(Case):
    name = "export"
    pause = PAUSE_IN_WRITE

    def __init__(self, world, tmp):
        super().__init__(world, tmp)
        self.db = tmp / "t.db"
        shutil.copy(world.tiny, self.db)
        self.out = tmp / "out"

    def argv(self):
        return ["export", "--study", "tiny", "--storage", str(self.db), "-o", str(self.out)]

    def artifacts(self) -> list[str]:
        return sorted(p.name for p in self.out.glob("*.json")) if self.out.exists() else []

    def intact(self):
        return len(self.artifacts()) in (0, 3)  # all or nothing

    def resumed(self, run):
        return self.artifacts() == ["balanced.json", "max-accuracy.json", "max-compression.json"]


class ApplyCase(Case):
    name = "apply"
    pause = PAUSE_IN_WRITE

    def __init__(self, world, tmp):
        super().__init__(world, tmp)
        self.out = tmp / "ckpt"

    def argv(self):
        return ["apply", str(self.world.artifact), "-o", str(self.out), "--model", str(self.world.model)]

    def intact(self):
        from profiling.deploy.checkpoint import read_manifest

        if not self.out.exists():
            return True
        read_manifest(self.out)
        return (self.out / "model.safetensors").is_file()

    def resumed(self, run):
        return self.out.is_dir() and self.intact()


CASES = {c.name: c for c in (ProfileCase, SearchCase, ExportCase, ApplyCase)}


@pytest.mark.parametrize("signame", list(SIGNALS))
@pytest.mark.parametrize("command", list(CASES))
def test_signal_during_command(zygote, world, tmp_path, command, signame):
    case = CASES[command](world, tmp_path)
    signum = SIGNALS[signame]
    run = zygote.start(case.argv(), tmp_path, pause={**case.pause, "marker": str(tmp_path / "paused")}
                       if case.pause else None)
    assert wait_until(case.in_flight), f"{command} never got under way: {run.stderr[-500:]}"
    run.signal(signum)
    code = run.wait()
    lines = stderr_lines(run.stderr)
    intact, temps = case.intact(), case.temps()
    row = dict(table="signals", command=command, fault=signame, exit=code, stderr_lines=len(lines),
               intact=intact, temps_left=len(temps), line=lines[0] if lines else None)
    assert intact, (command, signame, temps)
    assert "Traceback" not in run.stderr
    if signum == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:
        assert code == 128 + signum, (code, run.stderr)
        assert len(lines) == 1 and lines[0].startswith("empas: "), lines
        assert temps == [], temps  # a handled signal leaves nothing behind
    again = zygote.start(getattr(case, "resume_argv", case.argv)(), tmp_path)
    assert again.wait() == 0, again.stderr
    row.update(rerun_exit=0, resumed=case.resumed(again), temps_after_rerun=len(case.temps()))
    record(**row)
    assert row["resumed"], (command, signame, again.stdout[-500:])
    assert row["temps_after_rerun"] == 0, case.temps()  # the rerun removed what kill -9 left


# -- the TUI under signals and hang-up --------------------------------------------------------------------

def start_tui(zygote, tmp: Path, db: Path) -> tuple:
    pty = Pty()
    run = zygote.start(["--storage", str(db)], tmp, tty=pty.slave_name)
    return pty, run


@pytest.mark.parametrize("signame", list(SIGNALS))
def test_signal_to_the_tui(zygote, world, tmp_path, signame):
    db = tmp_path / "t.db"
    shutil.copy(world.synthetic, db)
    before = sha(db)
    pty, run = start_tui(zygote, tmp_path, db)
    try:
        assert pty.wait_for("help"), pty.text()[-2000:]
        time.sleep(0.5)
        if signame == "SIGHUP":
            pty.hang_up()  # what sshd does when the connection drops: the kernel sends SIGHUP
        else:
            run.signal(SIGNALS[signame])
        code = run.wait(60)
        time.sleep(0.2)
        text = pty.text()
    finally:
        pty.close()
    lines = after_terminal_reset(text)
    restored = "\x1b[?1049l" in text
    row = dict(table="signals", command="TUI", fault=signame + (" (pty hang-up)" if signame == "SIGHUP" else ""),
               exit=code, stderr_lines=len(lines) if signame in ("SIGINT", "SIGTERM") else None, intact=sha(db) == before,
               temps_left=len(hidden_temps(tmp_path)), terminal_restored=restored if signame != "SIGHUP" else None)
    record(**row)
    assert row["intact"] and row["temps_left"] == 0, (row, hidden_temps(tmp_path))
    if SIGNALS[signame] == signal.SIGKILL:
        assert code == -signal.SIGKILL
        return
    assert code == 128 + SIGNALS[signame], (code, text[-1500:])
    assert "Traceback" not in text
    if signame != "SIGHUP":  # after a hang-up nobody sees the screen: only the exit code counts
        assert restored and len(lines) == 1 and lines[0].startswith("empas: "), lines


def test_hang_up_during_search_on_a_terminal(zygote, world, tmp_path):
    """`empas search` on a terminal that goes away: stdout and stderr are that terminal, so every later
    write fails (EIO); the search still ends its generation, saves it and exits 129."""
    case = SearchCase(world, tmp_path)
    pty = Pty()
    run = zygote.start(case.argv(), tmp_path, tty=pty.slave_name)
    try:
        assert wait_until(case.in_flight)
        pty.hang_up()
        code = run.wait(60)
    finally:
        pty.close()
    record(table="signals", command="search (on a terminal)", fault="SIGHUP (pty hang-up)", exit=code,
           stderr_lines=None, intact=case.intact(), temps_left=len(case.temps()))
    assert code == 128 + signal.SIGHUP and case.intact()


# -- damaged, read-only and full storage x commands ---------------------------------------------------------

STORAGE_COMMANDS = ("studies", "front", "search", "profile", "TUI")


def storage_argv(command: str, world, db: Path) -> list[str]:
    return {"studies": ["studies", "--storage", str(db)],
            "front": ["front", "--study", "a", "--storage", str(db)],
            "search": ["search", "--study", "a", "--storage", str(db), "--trials", str(P)],
            "search (new study)": ["search", "--study", "new", "--storage", str(db), "--model", str(world.model),
                                   "--quantizer", "rtn", "--bits", "2,4,16", "--granularity", "linear",
                                   "--calib-tokens", "64", "--heldout-tokens", "64", "--seq-len", "32",
                                   "--trials", str(P), "--population", str(P)],
            "profile": profile_argv(world.model, db)}[command]


def run_on_storage(zygote, world, tmp: Path, command: str, db: Path, fsize: int | None = None):
    """Run ``command`` on ``db``: (exit code, stderr lines). The TUI: quit with Ctrl-Q once drawn."""
    if command != "TUI":
        run = zygote.start(storage_argv(command, world, db), tmp, fsize=fsize)
        code = run.wait()
        return code, stderr_lines(run.stderr), run.stderr
    pty = Pty()
    run = zygote.start(["--storage", str(db)], tmp, tty=pty.slave_name, fsize=fsize)
    try:
        deadline = time.monotonic() + 120
        while run.code is None and time.monotonic() < deadline:
            if "help" in pty.text():
                time.sleep(1.0)
                pty.send(b"\x11")  # Ctrl-Q
                break
            code = run.zygote.wait(run.pid, 0.2)
            if code is not None:
                run.code = code
        code = run.wait(60)
        time.sleep(0.2)
        text = pty.text()
    finally:
        pty.close()
    return code, after_terminal_reset(text), text


def damaged(src: Path, dst: Path, how: str) -> Path:
    data = bytearray(src.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    else:
        mid = len(data) // 2
        data[mid:mid + 64 * 1024] = os.urandom(min(64 * 1024, len(data) - mid))
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("how", ["truncated", "random bytes"])
@pytest.mark.parametrize("command", STORAGE_COMMANDS)
def test_damaged_storage(zygote, world, tmp_path, command, how):
    db = damaged(world.synthetic, tmp_path / "d.db", "truncated" if how == "truncated" else "random")
    before = sha(db)
    code, lines, text = run_on_storage(zygote, world, tmp_path, command, db)
    row = dict(table="storage", command=command, fault=f"damaged ({how})", exit=code, stderr_lines=len(lines),
               intact=sha(db) == before, temps_left=len(hidden_temps(tmp_path)), line=lines[0] if lines else None)
    record(**row)
    assert code == 2 and len(lines) == 1 and "damaged" in lines[0] and ".recover" in lines[0], text[-1500:]
    assert row["intact"] and not Path(str(db) + "-journal").exists()


def prepared_storage(world, folder: Path, command: str = "") -> Path:
    """A copy of the synthetic study's storage (for a new study: the tiny model's, whose profile it
    reuses, so the first write is the new study's)."""
    db = folder / "s.db"
    shutil.copy(world.tiny if command == "search (new study)" else world.synthetic, db)
    return db


def contents(db: Path) -> tuple:
    """What must survive a failed write: the file passes quick_check and holds the same rows (a
    failed transaction may leave a hot journal, which the next open rolls back: opened read-write
    here, as the next command would)."""
    conn = sqlite3.connect(db, timeout=30)
    try:
        check = conn.execute("PRAGMA quick_check").fetchall()
        tables = [t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return check, {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}
    finally:
        conn.close()


READ_ONLY_EXPECTED = {"studies": 0, "front": 0, "search": 2, "search (new study)": 2, "profile": 2, "TUI": 0}


@pytest.mark.parametrize("command", list(READ_ONLY_EXPECTED))
def test_read_only_storage(zygote, world, tmp_path, command):
    if not MOUNT and ROOT_USER:
        record(table="storage", command=command, fault="read-only", exit=None, note="not run: root without mount")
        pytest.skip("root ignores file permissions and this machine cannot mount a read-only tmpfs")
    folder = tmp_path / "ro"
    folder.mkdir()
    with (small_tmpfs(folder, 16 << 20) if MOUNT else _chmod_read_only(folder)):
        db = prepared_storage(world, folder, command)
        before = sha(db)  # nothing can be written: byte-for-byte
        if MOUNT:
            remount_read_only(folder)
        else:
            db.chmod(0o444)
            folder.chmod(0o555)
        code, lines, text = run_on_storage(zygote, world, tmp_path, command, db)
        row = dict(table="storage", command=command, fault="read-only", exit=code, stderr_lines=len(lines),
                   intact=sha(db) == before, temps_left=len(hidden_temps(folder)), line=lines[0] if lines else None)
    record(**row)
    assert row["intact"] and code == READ_ONLY_EXPECTED[command], text[-1500:]
    if code == 2:
        assert len(lines) == 1 and "read-only" in lines[0], lines
    assert "Traceback" not in text


@pytest.mark.parametrize("command", list(READ_ONLY_EXPECTED))
def test_full_storage_disk(zygote, world, tmp_path, command):
    folder = tmp_path / "full"
    folder.mkdir()
    fsize = None
    source = prepared_storage(world, tmp_path, command)
    before = contents(source)
    if MOUNT:
        size = source.stat().st_size + (64 << 10)
        with small_tmpfs(folder, size):
            db = prepared_storage(world, folder, command)
            fill(folder)
            code, lines, text = run_on_storage(zygote, world, tmp_path, command, db)
            intact = contents(db) == before
    else:  # no tmpfs: the file may not grow past its size (EFBIG instead of ENOSPC)
        db = prepared_storage(world, folder, command)
        fsize = db.stat().st_size
        code, lines, text = run_on_storage(zygote, world, tmp_path, command, db, fsize=fsize)
        intact = contents(db) == before
    row = dict(table="storage", command=command, fault="full disk" if MOUNT else "file-size limit", exit=code,
               stderr_lines=len(lines), intact=intact, temps_left=len(hidden_temps(folder)),
               line=lines[0] if lines else None)
    record(**row)
    assert intact and code == READ_ONLY_EXPECTED[command], text[-1500:]
    if code == 2:
        assert len(lines) == 1 and ("full" in lines[0] or "disk" in lines[0]), lines
    assert "Traceback" not in text


class _chmod_read_only:
    def __init__(self, folder: Path):
        self.folder = folder

    def __enter__(self):
        return self.folder

    def __exit__(self, *exc):
        self.folder.chmod(0o755)
        return False


# -- full output disk x export, apply, evaluate --csv ----------------------------------------------------------

def output_argv(command: str, world, tmp: Path, out: Path) -> list[str]:
    db = tmp / "t.db"
    shutil.copy(world.tiny, db)
    return {"export": ["export", "--study", "tiny", "--storage", str(db), "-o", str(out / "arts")],
            "apply": ["apply", str(world.artifact), "-o", str(out / "ckpt"), "--model", str(world.model)],
            "evaluate --csv": ["evaluate", str(world.artifact), "--model", str(world.model), "--heldout-tokens",
                               "64", "--seq-len", "32", "--csv", str(out / "rows.csv")]}[command]


# room left on the output disk: one artifact (2 KB) fits, three do not: the set must not half-appear;
# without a tmpfs, the largest file the process may write instead
ROOM_LEFT = {"export": 4096, "apply": 4096, "evaluate --csv": 0}
FILE_SIZE_LIMIT = {"export": 1024, "apply": 1024, "evaluate --csv": 16}


@pytest.mark.parametrize("command", list(ROOM_LEFT))
def test_full_output_disk(zygote, world, tmp_path, command):
    out = tmp_path / "out"
    out.mkdir()
    if MOUNT:
        with small_tmpfs(out, 64 << 10):
            fill(out, leave_bytes=ROOM_LEFT[command])
            (out / "filler").rename(out / ".filler")
            run = zygote.start(output_argv(command, world, tmp_path, out), tmp_path)
            code = run.wait()
            left = sorted(p.name for p in out.iterdir() if p.name != ".filler")
    else:
        run = zygote.start(output_argv(command, world, tmp_path, out), tmp_path, fsize=FILE_SIZE_LIMIT[command])
        code = run.wait()
        left = sorted(p.name for p in out.iterdir())
    lines = stderr_lines(run.stderr)
    row = dict(table="output", command=command, fault="full disk" if MOUNT else "file-size limit", exit=code,
               stderr_lines=len(lines), intact=left == [], temps_left=len([n for n in left if ".tmp-" in n]),
               line=lines[0] if lines else None)
    record(**row)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("empas: error: cannot write"), run.stderr
    assert left == [], left  # no partial artifact set, no empty folder, no temp


# -- measure: its measuring child process goes with it ---------------------------------------------------------

def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_signal_during_measure_stops_its_child(zygote, world, tmp_path, signame):
    ckpt = tmp_path / "ckpt"
    assert zygote.start(ApplyCase(world, tmp_path).argv(), tmp_path).wait() == 0
    run = zygote.start(["measure", str(ckpt), "--heldout-tokens", "64", "--seq-len", "32", "--gen-tokens", "4"],
                       tmp_path)
    assert wait_until(lambda: children(run.pid)), run.stderr
    child = children(run.pid)[0]
    run.signal(SIGNALS[signame])
    code = run.wait()
    lines = stderr_lines(run.stderr)
    gone = wait_until(lambda: not alive(child), timeout=10)
    record(table="signals", command="measure", fault=signame, exit=code, stderr_lines=len(lines), intact=True,
           temps_left=len(hidden_temps(tmp_path)), child_left_running=not gone, line=lines[0] if lines else None)
    assert code == 128 + SIGNALS[signame] and len(lines) == 1, run.stderr
    assert gone, "the measuring process outlived the command"
