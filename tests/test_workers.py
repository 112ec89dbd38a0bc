"""Profile workers sharing one storage: claims in the profile tables (SQLite and PostgreSQL), two real
`empas profile` processes splitting one profile, and a worker killed mid-gene whose claim expires."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from sqlalchemy import create_engine, text

from cli_helpers import empas_process, run_cli
from profiling.gene_claims import claimable_genes, live_foreign_claims, missing_cells
from storage.database import open_database
from storage.workers import claim_ttl, new_worker_id, worker_is_dead_here

# The tiny random Llama per linear: 21 genes x 3 RTN types = 63 cells; 2048 tokens make a cell slow
# enough (tens of ms on one thread) that two workers overlap.
TINY_LINEAR = ["--quantizer", "rtn", "--granularity", "linear", "--bits", "2,3,4", "--group-size", "32",
               "--calib-tokens", "2048", "--seq-len", "64", "--threads", "1", "--json"]
CELLS = 63


# -- the pure parts --------------------------------------------------------------------------------

def test_claimable_genes_skip_finished_and_foreign_ones():
    needed = [[(0, "2"), (0, "4")], [(1, "2"), (1, "4")], [(2, "2")], [(3, "2")]]
    missing = missing_cells(needed, {(0, "2"), (0, "4"), (1, "2")})
    assert missing == [[], [(1, "4")], [(2, "2")], [(3, "2")]]
    now = 100.0
    claims = {1: ("me:1:a", 200.0), 2: ("other:2:b", 200.0), 3: ("gone:3:c", 99.0), 0: ("dead:4:d", 500.0)}
    held = live_foreign_claims(claims, "me:1:a", now, is_dead=lambda w: w.startswith("dead"))
    assert held == {2}  # ours, expired and dead ones do not block
    assert claimable_genes(missing, held) == [1, 3]


def test_claim_ttl_setting(monkeypatch):
    monkeypatch.delenv("EMPAS_CLAIM_TTL", raising=False)
    assert claim_ttl() == 180.0 and claim_ttl(2.5) == 2.5
    monkeypatch.setenv("EMPAS_CLAIM_TTL", "7")
    assert claim_ttl() == 7.0
    for bad in ("soon", "0", "-3", "nan"):
        monkeypatch.setenv("EMPAS_CLAIM_TTL", bad)
        with pytest.raises(ValueError, match="EMPAS_CLAIM_TTL|positive"):
            claim_ttl()


@pytest.mark.parametrize("argv,needle", [
    (["--threads", "0"], "--threads N must be a positive integer"),
    (["--claim-ttl", "0"], "claim TTL 0.0 must be a positive number"),
])
def test_bad_worker_options_fail_in_one_line_before_the_model(argv, needle, capsys, tmp_path, monkeypatch):
    from empas_tui.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["profile", *argv, "--storage", str(tmp_path / "w.db")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("empas: error:") and needle in err[0], err
    assert list(tmp_path.iterdir()) == []  # no storage created


# -- claims in the store ---------------------------------------------------------------------------

def test_claims_are_exclusive_renewable_and_expire(storage_url):
    store = open_database(storage_url).profiles
    assert store.claims("k") == {}  # reading creates nothing
    a, b = "host-a:1:aa", "host-b:2:bb"
    t = time.time()
    assert store.claim("k", 0, a, ttl=60, now=t)
    assert not store.claim("k", 0, b, ttl=60, now=t + 1)  # a holds it
    assert store.claim("k", 1, b, ttl=60, now=t + 1)
    assert store.claim("other-profile", 0, b, ttl=60, now=t + 1)  # claims are per profile
    assert store.renew("k", 1, b, ttl=60) and not store.renew("k", 1, a, ttl=60)
    assert {g: w for g, (w, _) in store.claims("k").items()} == {0: a, 1: b}
    # a's claim expires (a died on another machine): the next claimer deletes it and takes the gene
    assert store.claim("k", 0, b, ttl=60, now=t + 61)
    assert store.claims("k")[0][0] == b and not store.renew("k", 0, a, ttl=60)
    store.release("k", 0, a)  # not a's any more: nothing happens
    assert 0 in store.claims("k")
    store.release("k", 0, b)
    store.release("k", 1, b)
    assert store.claims("k") == {}


def test_claim_of_a_dead_worker_on_this_machine_is_taken_at_once(tmp_path):
    store = open_database(str(tmp_path / "c.db")).profiles
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = f"{socket.gethostname()}:{int(gone.stdout)}:x"
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = f"{socket.gethostname()}:{alive.pid}:y"
        assert worker_is_dead_here(dead) and not worker_is_dead_here(live)
        assert not worker_is_dead_here(f"elsewhere:{int(gone.stdout)}:z")  # another machine: wait for expiry
        assert store.claim("k", 0, dead, ttl=3600) and store.claim("k", 1, live, ttl=3600)
        me = new_worker_id()
        assert me.startswith(f"{socket.gethostname()}:{os.getpid()}:")
        assert store.claim("k", 0, me, ttl=60)  # its process is gone: no hour-long wait
        assert not store.claim("k", 1, me, ttl=60)  # its process runs: it keeps the gene
    finally:
        alive.kill()
        alive.wait()


# -- real workers ----------------------------------------------------------------------------------

def cell_rows(url: str) -> list[tuple]:
    """(gene, qtype, seconds) of every stored cell, and the claims left, read with a fresh engine."""
    engine = create_engine(url if "://" in url else f"sqlite:///{url}")
    try:
        with engine.connect() as conn:
            cells = conn.execute(text("SELECT gene_index, qtype, seconds FROM empas_profile_cells")).all()
            claims = conn.execute(text("SELECT gene_index, worker, expires FROM empas_profile_claims")).all()
        return [tuple(r) for r in cells], [tuple(r) for r in claims]
    except Exception:  # noqa: BLE001 - tables not created yet
        return [], []
    finally:
        engine.dispose()


def measured_here(run: dict) -> int:
    return CELLS - run["reused_entries"] - run["remote_entries"]


def test_two_workers_split_one_profile(storage_url, tiny_model_dir, tmp_path):
    """Two `empas profile` processes, same flags, same storage: both exit 0 with the same complete
    profile, every cell is measured by exactly one of them, and each measured some."""
    argv = ["profile", "--model", str(tiny_model_dir), *TINY_LINEAR, "--storage", storage_url]
    procs = [empas_process(*argv, cwd=tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    runs = [json.loads(out) for out, _ in outs]
    assert runs[0]["S"] == runs[1]["S"] and len(runs[0]["S"]) == 21
    assert runs[0]["base_loss"] == runs[1]["base_loss"]
    here = [measured_here(r) for r in runs]
    assert sum(here) == CELLS and min(here) > 0, here  # no cell measured twice, no worker idle
    for (_, err), r, n in zip(outs, runs, here):  # each says what the other one did
        if r["remote_entries"]:
            assert f"{n} cells measured here, {r['remote_entries']} by other workers" in err, err
    cells, claims = cell_rows(storage_url)
    assert len(cells) == CELLS and all(s > 0 for _, _, s in cells) and claims == []


def test_killed_worker_claim_expires_and_another_takes_the_gene(tiny_model_dir, tmp_path, capsys, one_torch_thread):
    """kill -9 of a worker mid-gene leaves its claim; once it expires (here 5 s) a new worker takes the
    gene over and completes the profile. The killed worker runs under another name, as a worker on
    another machine would, so only the expiry frees its gene."""
    db = tmp_path / "k.db"
    argv = ["profile", "--model", str(tiny_model_dir), *TINY_LINEAR, "--storage", str(db)]
    env = {"EMPAS_WORKER_NAME": "machine-a", "EMPAS_CLAIM_TTL": "5"}
    victim = subprocess.Popen([sys.executable, "-m", "empas_tui", *argv], cwd=tmp_path, env=worker_env(env),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and victim.poll() is None:
            cells, claims = cell_rows(str(db))
            if len(cells) >= 3 and claims:  # a gene is in and the next one is being measured
                victim.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        if victim.poll() is None:
            victim.kill()
        victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "the worker finished before it could be killed"
    cells, claims = cell_rows(str(db))
    assert len(claims) == 1 and claims[0][1].startswith("machine-a:"), claims
    held_gene = claims[0][0]
    assert held_gene not in {g for g, _, _ in cells} and len(cells) % 3 == 0  # whole genes only
    stored_at_kill = len(cells)
    code, out, err = run_cli(capsys, *argv)  # the next worker, in this process (no second start-up to wait for)
    assert code == 0, err
    run = json.loads(out)
    assert run["reused_entries"] == stored_at_kill and measured_here(run) == CELLS - stored_at_kill
    cells, claims = cell_rows(str(db))
    assert len(cells) == CELLS and held_gene in {g for g, _, _ in cells} and claims == []


def worker_env(extra: dict) -> dict:
    from cli_helpers import cli_env

    return {**cli_env(), **extra}


# -- the TUI ---------------------------------------------------------------------------------------

async def test_tui_shows_the_cells_another_worker_stores(tmp_path, tiny_loaded, one_torch_thread):
    """The profile screen on a storage where another worker holds gene 1: it measures genes 0 and 2,
    says it waits, and shows gene 1's cells (measured by that worker, on its own copy of the model)
    as they are stored, marked as theirs; its profile counts them."""
    from conftest import TinyTokenizer, make_tiny_llama, rtn_settings
    from empas_tui.tui.app import EmpasApp
    from profiling.models import LoadedModel
    from profiling.runner import PrefixRunner
    from profiling.sensitivity import cells_to_measure, kl_sensitivity, prepare
    from textual.widgets import DataTable
    from tui_helpers import SMALL, empty_storage, fill_setup, open_setup, screen_name, wait_for

    storage = empty_storage(tmp_path)
    app = EmpasApp(storage=storage, loader=lambda spec: tiny_loaded)
    other = LoadedModel(make_tiny_llama(), TinyTokenizer(), model_id="tiny-llama", fingerprint="tiny" * 16,
                        source_path="")
    setup = prepare(rtn_settings(bits="2,4,16", calib_tokens=64, heldout_tokens=64, seq_len=32), other)
    store = open_database(storage).profiles
    them = "machine-b:1:other"
    assert store.claim(setup.key, 1, them, ttl=600)
    async with app.run_test(size=(100, 30)) as pilot:
        await open_setup(pilot)
        await fill_setup(pilot, SMALL)
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: screen_name(app) == "ProfileScreen", "the profile screen")
        screen = app.screen
        await wait_for(pilot, lambda: "waiting for 1 layers" in screen.status, "the wait for gene 1")
        assert {i for i, _ in screen.values} == {0, 2} and screen.state == "running"
        # the other worker measures gene 1 and commits it (its claim released in the same transaction)
        runner = PrefixRunner(other.model, setup.inventory, setup.tokens.calibration)
        theirs = kl_sensitivity(runner, setup.inventory, setup.quantizer, setup.quantizer.qtypes,
                                genes=[(1, cells_to_measure(setup.inventory, setup.quantizer,
                                                            setup.quantizer.qtypes)[1])])
        store.add_entries(setup.key, theirs, seconds=0.1, release=(1, them))
        await wait_for(pilot, lambda: screen.state == "done", "the finished profile")
        assert screen.remote == 3 and screen.remote_genes == {1}
        assert {q: screen.values[(1, q)] for q in ("2", "4", "16")} == {q: v for (_, q), v in theirs.items()}
        assert screen.profile.remote_entries == 3 and "3 of 9 measured by other workers" in screen.status
        row = screen.query_one("#sensitivity", DataTable).get_row("1")
        assert str(row[3]) == "✓" and row[3].style == "cyan"
        assert store.claims(setup.key) == {}
