"""Fault-injection harness: run ``empas`` commands as real processes, cheaply, and hurt them.

Starting ``python -m empas_tui`` costs seconds of imports (torch, transformers, Optuna, Textual) on
every run; a fault matrix needs dozens of runs. So a *zygote* process imports the CLI once and forks a
child per run. The child is a real process with its own pid, session, signal dispositions, file
descriptors and exit status; it calls ``empas_tui.cli.main(argv)`` exactly as ``python -m empas_tui``
does, and exits as the interpreter would (non-daemon threads joined, atexit handlers run, stdout and
stderr flushed: a failed flush exits 120) without tearing down every inherited object. Nothing else is shared: the zygote never opens a
database, loads a model or starts a thread before forking.

What a run can be given: argv, cwd, environment, stdout/stderr files or a pty (the TUI, hang-ups),
a file-size limit (``RLIMIT_FSIZE`` with SIGXFSZ ignored, so writes fail with EFBIG, for machines
where no small tmpfs can be mounted), and a *pause*: a function of ours that, the first time it is
called, writes a marker file and sleeps, so a signal can be sent while the command is inside it (e.g.
``storage.atomic._fsync``: temp files written, not yet renamed).

Test-side helpers: :class:`Zygote` (start, signal, wait), :class:`Pty`, small mounts
(:func:`small_tmpfs`, with a fallback when mounting is not allowed) and the report (:func:`record`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# == the zygote (runs as ``python tests/fault_harness.py``) ==============================================

def _preload() -> None:
    import empas_tui.cli.entry as entry

    entry.build_parser()  # every command module
    for name in ("profiling.sensitivity", "profiling.evaluation", "profiling.models", "profiling.deploy.checkpoint",
                 "search.nsga", "search.catalogue", "empas_tui.jobs.search", "empas_tui.jobs.export",
                 "empas_tui.tui.app", "optuna", "transformers", "safetensors.torch"):
        __import__(name)
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: F401
    import optuna

    # Optuna and alembic import their schema code on first use: an in-memory database, disposed of
    # before any fork (no file, no thread).
    optuna.storages.RDBStorage("sqlite:///:memory:").engine.dispose()
    import transformers.models.llama.modeling_llama  # noqa: F401
    import gc

    gc.freeze()  # the children's collections leave the inherited heap alone (no copy-on-write)


def _pause(spec: dict) -> None:
    """Wrap ``module.function`` (or ``module.Class.method``) so that its call number ``after + 1``
    writes ``marker`` and sleeps ``seconds`` before going on."""
    import importlib

    owner = importlib.import_module(spec["module"])
    *path, name = spec["function"].split(".")
    for attr in path:
        owner = getattr(owner, attr)
    original = getattr(owner, name)
    state = {"calls": 0}

    def paused(*args, **kwargs):
        state["calls"] += 1
        if state["calls"] == int(spec.get("after", 0)) + 1:
            Path(spec["marker"]).write_text(str(os.getpid()))
            time.sleep(spec.get("seconds", 60))
        return original(*args, **kwargs)

    setattr(owner, name, paused)


def _child(req: dict) -> None:
    os.setsid()
    if req.get("tty"):
        fd = os.open(req["tty"], os.O_RDWR)  # the session leader's first tty: its controlling terminal
        for target in (0, 1, 2):
            os.dup2(fd, target)
        os.close(fd)
    else:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 1)  # a file or a FIFO
        os.dup2(os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
    os.chdir(req["cwd"])
    os.environ.update(req.get("env") or {})
    if req.get("fsize") is not None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(req["fsize"]), resource.RLIM_INFINITY))
    if req.get("pause"):
        _pause(req["pause"])
    from empas_tui.cli import main

    sys.argv = ["empas", *req["argv"]]
    try:
        code = main(req["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # what the interpreter would print and exit 1 for
        import traceback

        traceback.print_exc()
        code = 1
    os._exit(_shutdown(int(code or 0)))


def _shutdown(code: int) -> int:
    """What the interpreter does at exit that a command can observe -- wait for non-daemon threads,
    atexit handlers, flush stdout/stderr (a failed flush exits 120) -- without the teardown of every
    module and object, which in a forked child copies the whole inherited heap (seconds)."""
    import atexit

    threading._shutdown()  # the interpreter's own "wait for non-daemon threads" step
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            code = 120 if code == 0 else code
    return code


def _serve() -> None:
    _preload()
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        if "wait" in req:
            pid, deadline = int(req["wait"]), time.monotonic() + float(req.get("timeout", 120))
            status = None
            while time.monotonic() < deadline:
                done, raw = os.waitpid(pid, os.WNOHANG)
                if done:
                    status = os.waitstatus_to_exitcode(raw)
                    break
                time.sleep(0.02)
            out.write(json.dumps({"status": status}) + "\n")
            out.flush()
            continue
        out.flush()
        pid = os.fork()
        if pid == 0:
            _child(req)
        out.write(json.dumps({"pid": pid}) + "\n")
        out.flush()


# == the test side =======================================================================================

def child_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1",
               TERM="xterm-256color", COLUMNS="100", LINES="30")
    env.pop("EMPAS_DEBUG", None)
    return env


class Run:
    """A running command: ``pid``, its output files, ``wait()`` -> exit code (negative: killed by)."""

    def __init__(self, zygote: "Zygote", pid: int, stdout: Path | None, stderr: Path | None):
        self.zygote, self.pid, self.stdout_path, self.stderr_path = zygote, pid, stdout, stderr
        self.code: int | None = None
        self.copiers: list[threading.Thread] = []

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float = 120) -> int:
        if self.code is None:
            self.code = self.zygote.wait(self.pid, timeout)
            if self.code is None:
                os.kill(self.pid, signal.SIGKILL)
                self.zygote.wait(self.pid, 30)
                raise TimeoutError(f"empas pid {self.pid} did not finish in {timeout} s")
            for thread in self.copiers:
                thread.join(10)
        return self.code

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path else ""

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path else ""


def _fifo_to_file(path: Path) -> tuple[str, threading.Thread]:
    """A FIFO whose content a thread copies into ``path``: (its name, for the child; the thread)."""
    fifo = path.with_name(path.name + ".fifo")
    os.mkfifo(fifo)
    path.write_bytes(b"")

    def copy() -> None:
        with open(fifo, "rb") as src, open(path, "ab") as dst:
            for chunk in iter(lambda: src.read1(65536), b""):
                dst.write(chunk)
                dst.flush()

    thread = threading.Thread(target=copy, daemon=True)
    thread.start()
    return str(fifo), thread


class Zygote:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve())], cwd=ROOT, env=child_env(),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.lock = threading.Lock()
        line = self.proc.stdout.readline()
        if line != "ready\n":
            raise RuntimeError(f"fault zygote did not start: {line!r}")
        self.count = 0
        self.runs: list[Run] = []

    def _ask(self, req: dict) -> dict:
        with self.lock:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            return json.loads(self.proc.stdout.readline())

    def start(self, argv: list[str], cwd: Path, env: dict | None = None, tty: str | None = None,
              fsize: int | None = None, pause: dict | None = None, logs: Path | None = None) -> Run:
        self.count += 1
        logs = logs or cwd
        out = err = None
        streams, copiers = {}, []
        if tty is None:
            out, err = logs / f"run{self.count}.out", logs / f"run{self.count}.err"
            streams = {"stdout": str(out), "stderr": str(err)}
            if fsize is not None:  # the limit would cut the command's own output files: FIFOs then
                (streams["stdout"], t1), (streams["stderr"], t2) = _fifo_to_file(out), _fifo_to_file(err)
                copiers = [t1, t2]
        req = {"argv": argv, "cwd": str(cwd), "env": env or {}, "tty": tty, "fsize": fsize, "pause": pause,
               "stdout": streams.get("stdout"), "stderr": streams.get("stderr")}
        run = Run(self, self._ask(req)["pid"], out, err)
        run.copiers = copiers
        self.runs.append(run)
        return run

    def reap(self) -> None:
        """Kill every run that is still going (a failed test must not leave a search running)."""
        for run in self.runs:
            if run.code is None:
                try:
                    os.kill(run.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                run.code = self.wait(run.pid, 30)
        self.runs = []

    def wait(self, pid: int, timeout: float) -> int | None:
        return self._ask({"wait": pid, "timeout": timeout})["status"]

    def close(self) -> None:
        self.reap()
        self.proc.stdin.close()
        self.proc.wait(30)


class Pty:
    """A pseudo-terminal: the child gets ``slave_name``; everything it draws is collected from the master
    by a thread. ``hang_up()`` closes the master, as sshd does when the connection drops."""

    def __init__(self, rows: int = 30, cols: int = 100):
        import fcntl
        import struct
        import termios

        self.master, self.slave = os.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.slave_name = os.ttyname(self.slave)
        self.output = bytearray()
        self._open = True
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        import select

        while self._open:
            try:
                ready, _, _ = select.select([self.master], [], [], 0.1)
                if ready:
                    self.output += os.read(self.master, 65536)
            except OSError:  # EIO: no slave open at the moment; or closed
                time.sleep(0.05)

    def text(self) -> str:
        return self.output.decode("utf-8", errors="replace")

    def wait_for(self, needle: str, timeout: float = 120) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if needle in self.text():
                return True
            time.sleep(0.1)
        return False

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def close_slave(self) -> None:
        if self.slave is not None:
            os.close(self.slave)
            self.slave = None

    def hang_up(self) -> None:
        self.close_slave()
        self._open = False
        self._thread.join(2)
        os.close(self.master)
        self.master = None

    def close(self) -> None:
        self.close_slave()
        if self.master is not None:
            self._open = False
            self._thread.join(2)
            os.close(self.master)
            self.master = None


LEAVE_ALT_SCREEN = "\x1b[?1049l"


ESCAPES = re.compile(r"\x1b(\[[0-9;?<>=$]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[()][0-9A-Za-z]|[=>])")


def after_terminal_reset(text: str) -> list[str]:
    """Lines the TUI printed after giving the terminal back (all of them if it never took it), without
    the terminal's control sequences."""
    tail = ESCAPES.sub("", text.rsplit(LEAVE_ALT_SCREEN, 1)[-1])
    return [line for line in tail.replace("\r", "").split("\n") if line.strip()]


# -- small file systems ----------------------------------------------------------------------------------

def can_mount() -> bool:
    probe = Path(f"/tmp/empas-mount-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                            capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", str(probe)], capture_output=True)
        return ok
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()


@contextlib.contextmanager
def small_tmpfs(folder: Path, size_bytes: int):
    """A tmpfs of ``size_bytes`` mounted on ``folder`` for the block."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={max(4096, size_bytes)}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def remount_read_only(folder: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)


def fill(folder: Path, leave_bytes: int = 0) -> None:
    """Fill the file system holding ``folder`` until ``leave_bytes`` (rounded to pages) are free."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    with open(folder / "filler", "wb") as fh:
        with contextlib.suppress(OSError):
            fh.write(b"\0" * max(0, free - leave_bytes))
            fh.flush()


def hidden_temps(folder: Path) -> list[str]:
    """Temp files and folders of atomic writes (``.<name>.tmp-*``, ``.<name>.old-*``) below ``folder``."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name)


# -- the report ------------------------------------------------------------------------------------------

def record(**row) -> None:
    """Append one result row (JSON) to ``$EMPAS_RELIABILITY_REPORT`` (docs/reliability.md's tables)."""
    path = os.environ.get("EMPAS_RELIABILITY_REPORT")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _serve()
