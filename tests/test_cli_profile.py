"""The `empas profile` command: bad input fails fast in one line; SmolLM2 end to end; kill -9 resume;
a stored Fisher profile is what a later search uses."""

import json
import signal
import sqlite3
import time

import pytest

from cli_helpers import empas_process, run_cli
from empas_tui.cli import main


@pytest.mark.parametrize("argv,needle", [
    (["profile", "--bits", "2,4,99"], "bit-width 99"),
    (["profile", "--bits", "two"], "comma-separated"),
    (["profile", "--group-size", "0"], "group size 0"),
    (["profile", "--calib-tokens", "-5"], "pass --calib-tokens N"),
    (["profile", "--storage", "/nonexistent-dir/x.db"], "does not exist"),
    (["profile", "--storage", "postgresql://bob:hunter2@127.0.0.1:1/db"], "cannot open storage"),
    (["profile", "--model", "/no/such/model.gguf"], "does not exist"),
    (["profile", "--text", "/no/such/file.txt"], "/no/such/file.txt does not exist"),
])
def test_bad_input_is_one_line_and_nonzero(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("empas: error:") and needle in err[0]
    assert "hunter2" not in err[0]
    assert not list(tmp_path.glob("*.tmp"))


def test_search_uses_the_stored_fisher_profile(tiny_model_dir, tmp_path, capsys, one_torch_thread):
    """`empas profile --metric fisher` then `empas search` (no --metric): the search runs on the stored
    Fisher profile and says so on stderr, instead of measuring a KL profile nobody asked for."""
    from storage.database import open_database

    db = str(tmp_path / "f.db")
    model = ["--model", str(tiny_model_dir), "--quantizer", "rtn", "--granularity", "block", "--bits", "2,4,16",
             "--group-size", "32", "--calib-tokens", "64", "--heldout-tokens", "64", "--seq-len", "32",
             "--storage", db]
    code, out, err = run_cli(capsys, "profile", *model, "--metric", "fisher", "--json")
    assert code == 0, err
    fisher = json.loads(out)
    assert fisher["metric"] == "fisher" and fisher["reused_entries"] == 0
    code, out, err = run_cli(capsys, "search", *model, "--trials", "10", "--population", "10", "--json")
    assert code == 0, err
    assert err.count("\n") == 1 and "using the stored fisher profile" in err and "--metric kl" in err, err
    result = json.loads(out)
    assert result["study_name"].endswith("-block-2.4.16-fisher") and result["trials_run"] == 10
    profiles = open_database(db).profiles.list_profiles()
    assert [p["metric"] for p in profiles] == ["fisher"]  # no KL profile was measured
    # asking for KL explicitly measures it, under its own study
    code, out, err = run_cli(capsys, "search", *model, "--metric", "kl", "--trials", "10", "--population", "10",
                             "--json")
    assert code == 0 and "fisher" not in err, err
    assert json.loads(out)["study_name"].endswith("-block-2.4.16")
    assert sorted(p["metric"] for p in open_database(db).profiles.list_profiles()) == ["fisher", "kl"]


def test_empty_text_file_is_refused(capsys, tmp_path):
    empty = tmp_path / "e.txt"
    empty.write_text("\n\n")
    assert main(["profile", "--text", str(empty), "--storage", str(tmp_path / "p.db")]) == 2
    assert "is empty" in capsys.readouterr().err


@pytest.mark.smollm
def test_profile_smollm_json_then_reuse(smollm, tmp_path, capsys):
    db = tmp_path / "p.db"
    argv = ["profile", "--quantizer", "rtn", "--granularity", "block", "--calib-tokens", "64", "--seq-len", "64",
            "--bits", "2,16", "--storage", str(db), "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["granularity"] == "block" and len(out["genes"]) == 30
    assert sum(g["params"] for g in out["genes"]) == 30 * 3_538_944
    assert all(out["S"][g["name"]]["2"] > 0 and out["S"][g["name"]]["16"] == 0 for g in out["genes"])
    assert 1.0 < out["base_loss"] < 6.0 and out["reused_entries"] == 0
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["reused_entries"] == 60 and again["S"] == out["S"]


def test_killed_profile_resumes_from_finished_genes(tiny_model_dir, tmp_path, capsys, one_torch_thread):
    """kill -9 of `empas profile` half-way: whole genes are stored, and the rerun measures only the rest
    and gives the same profile as an uninterrupted run (the tiny model: 21 linear genes, 3 types)."""
    db = tmp_path / "p.db"
    settings = ["--model", str(tiny_model_dir), "--quantizer", "rtn", "--granularity", "linear", "--bits", "2,3,4",
                "--group-size", "32", "--calib-tokens", "512", "--seq-len", "64", "--json"]
    argv = ["profile", *settings, "--storage", str(db)]
    proc = empas_process(*argv, cwd=tmp_path)  # a real process: the point is kill -9
    deadline = time.time() + 300  # generous: CI machines are slow and shared
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.005)
            if stored_cells(db) >= 3:  # the first gene is in
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "profiling finished before it could be killed"
    done_at_kill = stored_cells(db)  # what the killed process had committed
    assert 3 <= done_at_kill < 63 and done_at_kill % 3 == 0  # whole genes only: a gene's types commit together
    code, out, err = run_cli(capsys, *argv)  # the resume, in this process
    assert code == 0, err
    resumed = json.loads(out)
    assert resumed["reused_entries"] == done_at_kill and len(resumed["S"]) == 21 and stored_cells(db) == 63
    # random q/k projections barely matter: their KL can round to 0 at 3-4 bits
    assert all(v["2"] > 0 and v["2"] >= v["3"] >= v["4"] >= 0 for v in resumed["S"].values())
    code, out, err = run_cli(capsys, "profile", *settings, "--storage", str(tmp_path / "fresh.db"))
    fresh = json.loads(out)
    assert code == 0 and fresh["reused_entries"] == 0
    for gene, values in fresh["S"].items():
        assert resumed["S"][gene] == pytest.approx(values, rel=1e-5), gene


def stored_cells(db) -> int:
    """Profile cells committed in the SQLite file, read with plain sqlite3 (independent of EMPAS)."""
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM empas_profile_cells").fetchone()[0])
    except sqlite3.OperationalError:  # tables not created yet
        return 0
