"""``empas search`` / ``front`` / ``studies`` end to end on a tiny model folder, and their bad input."""

import json
import sys

import pytest

from cli_helpers import cli_env, run_cli, run_search, seed_synthetic_study


def test_search_end_to_end_on_a_model_folder(tiny_model_dir, tmp_path, capsys, one_torch_thread):
    db = str(tmp_path / "cli.db")  # a plain path is a SQLite file
    common = ["--model", str(tiny_model_dir), "--quantizer", "rtn", "--granularity", "block", "--bits", "2,4,16", "--group-size", "32", "--calib-tokens", "64",
              "--heldout-tokens", "64", "--seq-len", "32", "--storage", db]
    code, out, err = run_cli(capsys, "search", *common, "--trials", "30", "--population", "10", "--json")
    assert code == 0, err
    result = json.loads(out)
    name = result["study_name"]
    assert name.endswith("-block-2.4.16")
    assert result["trials_run"] == 30 and result["trials_total"] == 30 and not result["resumed"]
    assert result["front"] and set(result["front"][0]["qtypes"]) == {"block.0", "block.1", "block.2"}
    assert 0 < result["hypervolume_ratio"] <= 1.0 + 1e-9
    # again: the stored profile is reused and the study continues
    code, out, err = run_cli(capsys, "search", *common, "--trials", "10", "--json")
    again = json.loads(out)
    assert code == 0 and again["resumed"] and again["trials_total"] == 40 and again["first_generation"] == 3
    # by name only: no model needed
    code, out, err = run_cli(capsys, "search", "--study", name, "--storage", db, "--trials", "10")
    assert code == 0 and "resumed" in out and "predicted loss" in out, err
    code, out, err = run_cli(capsys, "front", "--study", name, "--storage", db, "--exact", "--json")
    front = json.loads(out)
    assert code == 0 and front["trials_complete"] == 50 and front["points"] and front["exact"]
    assert front["genes"] == ["block.0", "block.1", "block.2"]
    code, out, err = run_cli(capsys, "front", "--study", name, "--storage", db, "--exact")
    assert code == 0 and "exact front of the proxy" in out
    code, out, err = run_cli(capsys, "studies", "--storage", db, "--json")
    assert code == 0 and [r["name"] for r in json.loads(out)] == [name]
    code, out, err = run_cli(capsys, "studies", "--storage", db)
    assert code == 0 and name in out
    # another genome / bits for the same study: one line, nothing loaded
    code, out, err = run_cli(capsys, "search", "--study", name, "--storage", db, "--bits", "2,4,8,16")
    assert code == 2 and err.count("\n") == 1 and "uses 2,4,16, not 2,4,8,16" in err
    code, out, err = run_cli(capsys, "search", "--study", name, "--storage", db, "--granularity", "linear")
    assert code == 2 and "searches block genes" in err


def test_bad_input_is_one_line(tmp_path, capsys):
    db = str(tmp_path / "bad.db")
    seed_synthetic_study(db)
    cases = [
        (["search", "--study", "s", "--storage", db, "--population", "1"], "2 or more"),
        (["search", "--study", "s", "--storage", db, "--population", "9"], "--population 8"),
        (["front", "--study", "nope", "--storage", db], "no study named 'nope'"),
        (["search", "--study", "s", "--storage", str(tmp_path / "no" / "such" / "dir.db")], "does not exist"),
        (["studies", "--storage", "postgresql://u:secret@127.0.0.1:1/x"], "cannot open storage"),
        (["dashboard", "--storage", db, "--port", "70000"], "port 70000"),
    ]
    for argv, message in cases:
        code, out, err = run_cli(capsys, *argv)
        assert code == 2, (argv, err)
        assert err.startswith("empas: error: ") and err.count("\n") == 1 and message in err, err
        assert "secret" not in err


def test_ctrl_c_finishes_the_generation(tmp_path, capsys):
    import os
    import signal
    import threading

    import optuna

    db = str(tmp_path / "int.db")
    seed_synthetic_study(db)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        code, out, err = run_cli(capsys, "search", "--study", "s", "--storage", db, "--trials", "1000000", "--json")
    finally:
        timer.cancel()
    assert code == 130 and "interrupted" in err
    result = json.loads(out)
    assert result["stopped"] and 0 < result["trials_run"] < 1000000 and result["trials_run"] % 8 == 0
    trials = optuna.load_study(study_name="s", storage=f"sqlite:///{db}").trials
    assert len(trials) == 8 + result["trials_run"]
    assert {t.state for t in trials} == {optuna.trial.TrialState.COMPLETE}


def test_ctrl_c_while_profiling_stops_quietly_and_keeps_finished_genes(tiny_model_dir, tmp_path, capsys,
                                                                      one_torch_thread):
    """`empas search --model M` profiles first; a Ctrl-C then stops the profile after the gene in flight
    (no traceback, exit 130), the finished genes stay stored and the next run reuses them."""
    import os
    import signal
    import sqlite3
    import threading
    import time

    import optuna

    db = tmp_path / "prof.db"
    argv = ["search", "--model", str(tiny_model_dir), "--quantizer", "rtn", "--bits", "2,4,16",
            "--granularity", "linear", "--group-size", "32", "--calib-tokens", "512", "--heldout-tokens", "64",
            "--seq-len", "64", "--storage", str(db), "--trials", "20", "--population", "10", "--json"]
    cells_at_signal = []

    def interrupt_after_the_first_gene():
        deadline = time.time() + 120
        while time.time() < deadline:
            time.sleep(0.005)
            try:
                with sqlite3.connect(db) as conn:
                    n = conn.execute("SELECT COUNT(*) FROM empas_profile_cells").fetchone()[0]
            except sqlite3.Error:
                continue
            if n:
                cells_at_signal.append(n)
                os.kill(os.getpid(), signal.SIGINT)
                return

    watcher = threading.Thread(target=interrupt_after_the_first_gene, daemon=True)
    watcher.start()
    code, out, err = run_cli(capsys, *argv)
    watcher.join(timeout=5)
    assert cells_at_signal, "profiling never stored a gene"
    assert code == 130 and "interrupted" in err and "Traceback" not in err, err
    assert out == ""  # no result: the search did not start
    with sqlite3.connect(db) as conn:
        stored = conn.execute("SELECT COUNT(*) FROM empas_profile_cells").fetchone()[0]
    n_genes, n_cells = 21, 21 * 3  # 7 linears x 3 blocks; 3 qtypes each ("16" stored as 0)
    assert 0 < stored < n_cells and stored % 3 == 0  # whole genes only, stopped before the end
    assert optuna.get_all_study_names(f"sqlite:///{db}") == []
    code, out, err = run_cli(capsys, *argv)  # the same command resumes
    assert code == 0, err
    result = json.loads(out)
    assert result["trials_run"] == 20 and len(result["front"][0]["qtypes"]) == n_genes
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM empas_profile_cells").fetchone()[0] == n_cells


def test_front_into_a_closed_pipe_exits_quietly(tmp_path, capsys):
    """`empas front ... | head -3` in a real shell: head closes the pipe while empas still writes (the
    exact JSON front of a 70-gene study is far larger than a pipe buffer); empas stops without a
    BrokenPipeError traceback, with the exit status of a writer killed by SIGPIPE."""
    import shlex
    import subprocess

    from search.settings import SearchSettings
    from search.synthetic import synthetic_profile

    db = str(tmp_path / "pipe.db")
    run_search(SearchSettings(study_name="big", population=20, trials=60), synthetic_profile(blocks=10), db)
    for fmt, closed_early in ((["--exact", "--json"], True), (["--exact"], False)):
        code, full, err = run_cli(capsys, "front", "--study", "big", "--storage", db, *fmt)
        assert code == 0, err
        if closed_early:
            assert len(full) > 256 * 1024  # much more than the 64 KiB a pipe holds
        cmd = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "empas_tui", "front", "--study", "big",
                                                "--storage", db, *fmt])
        errfile = tmp_path / "err.txt"
        shell = subprocess.run(["bash", "-c", f"{cmd} 2>{shlex.quote(str(errfile))} | head -3; "
                                              'echo "status ${PIPESTATUS[0]}" >&2'],
                               capture_output=True, text=True, env=cli_env(), timeout=120)
        assert errfile.read_text() == ""  # no traceback, no "Exception ignored ... BrokenPipeError"
        assert shell.stdout.splitlines() == full.splitlines()[:3]
        status = shell.stderr.strip()
        assert status == "status 141" if closed_early else status in ("status 0", "status 141"), status


@pytest.mark.parametrize("argv, message", [
    (["front", "--study", "nope"], "no storage at"),
    (["studies"], "no studies in"),
    (["studies", "--json"], "[]"),
    (["export", "--study", "nope", "-o", "out"], "no storage at"),
])
def test_reading_commands_without_a_database_create_none(tmp_path, monkeypatch, capsys, argv, message):
    """A new user's first `empas front` / `studies` / `export` in an empty folder: one line that says
    there is no database (and how to make one), and no empty empas.db left behind."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EMPAS_STORAGE", raising=False)
    code, out, err = run_cli(capsys, *argv)
    if argv[0] == "studies":  # listing nothing is not an error
        assert code == 0 and err == "" and out.count("\n") == 1 and message in out, out
    else:
        assert code == 2 and err.count("\n") == 1 and err.startswith("empas: error: ") and message in err, err
        assert "no storage at empas.db: run `empas search` first" in err
    assert list(tmp_path.iterdir()) == []  # no empas.db, no output folder
