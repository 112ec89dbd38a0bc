"""The `empas profile` command: bad input fails fast in one line; SmolLM2 end to end; kill -9 resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from empas_tui.cli import main
from storage.profiles import ProfileStore

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("argv,needle", [
    (["profile", "--bits", "2,4,99"], "bit-width 99"),
    (["profile", "--bits", "two"], "comma-separated"),
    (["profile", "--group-size", "0"], "group size 0"),
    (["profile", "--calib-tokens", "-5"], "token count -5"),
    (["profile", "--storage", "/nonexistent-dir/x.db"], "does not exist"),
    (["profile", "--storage", "postgresql://bob:hunter2@127.0.0.1:1/db"], "cannot open storage"),
    (["profile", "--model", "/no/such/model.gguf"], "does not exist"),
    (["profile", "--text", "/no/such/file.txt"], "cannot read text file"),
])
def test_bad_input_is_one_line_and_nonzero(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("empas: error:") and needle in err[0]
    assert "hunter2" not in err[0]
    assert not list(tmp_path.glob("*.tmp"))


def test_empty_text_file_is_refused(capsys, tmp_path):
    empty = tmp_path / "e.txt"
    empty.write_text("\n\n")
    assert main(["profile", "--text", str(empty), "--storage", str(tmp_path / "p.db")]) == 2
    assert "is empty" in capsys.readouterr().err


@pytest.mark.smollm
def test_profile_smollm_json_then_reuse(smollm, tmp_path, capsys):
    db = tmp_path / "p.db"
    argv = ["profile", "--calib-tokens", "64", "--seq-len", "64", "--bits", "2,16", "--storage", str(db), "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["granularity"] == "block" and len(out["genes"]) == 30
    assert sum(g["params"] for g in out["genes"]) == 30 * 3_538_944
    assert all(out["S"][g["name"]]["2"] > 0 and out["S"][g["name"]]["16"] == 0 for g in out["genes"])
    assert 1.0 < out["base_loss"] < 6.0 and out["reused_entries"] == 0
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["reused_entries"] == 60 and again["S"] == out["S"]


@pytest.mark.smollm
def test_killed_profile_resumes_from_finished_genes(smollm, tmp_path):
    db = tmp_path / "p.db"
    argv = [sys.executable, "-m", "empas_tui", "profile", "--calib-tokens", "64", "--seq-len", "64",
            "--bits", "2,3,4", "--storage", str(db), "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    store = None
    deadline = time.time() + 900  # generous: CI machines are slow and shared
    done_at_kill = 0
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
            if db.exists():
                store = store or ProfileStore(f"sqlite:///{db}")
                keys = [p["key"] for p in store.list_profiles()]
                if keys and len(store.entries(keys[0])) >= 9:
                    done_at_kill = len(store.entries(keys[0]))
                    proc.send_signal(signal.SIGKILL)
                    break
    finally:
        if proc.poll() is None and not done_at_kill:
            proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "profiling finished before it could be killed"
    assert done_at_kill % 3 == 0  # whole genes only: a gene's bit-widths are committed together
    resumed = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    out = json.loads(resumed.stdout)
    assert out["reused_entries"] >= done_at_kill and len(out["S"]) == 30
    assert all(v["2"] > v["3"] > v["4"] > 0 for v in out["S"].values())
