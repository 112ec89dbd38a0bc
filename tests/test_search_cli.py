"""``empas search`` / ``front`` / ``studies`` end to end on a tiny model folder, and their bad input."""

import json

import pytest

from empas_tui.cli import main
from search.study import SearchSettings, run_search
from search.synthetic import synthetic_profile


@pytest.fixture
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_search_end_to_end_on_a_model_folder(tiny_model_dir, tmp_path, capsys, one_torch_thread):
    db = str(tmp_path / "cli.db")  # a plain path is a SQLite file
    common = ["--model", str(tiny_model_dir), "--bits", "2,4,16", "--group-size", "32", "--calib-tokens", "64",
              "--heldout-tokens", "64", "--seq-len", "32", "--storage", db]
    code, out, err = run_cli(capsys, "search", *common, "--trials", "30", "--population", "10", "--json")
    assert code == 0, err
    result = json.loads(out)
    name = result["study_name"]
    assert name.endswith("-block-2.4.16")
    assert result["trials_run"] == 30 and result["trials_total"] == 30 and not result["resumed"]
    assert result["front"] and set(result["front"][0]["bits"]) == {"block.0", "block.1", "block.2"}
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
    assert code == 2 and err.count("\n") == 1 and "uses bits 2,4,16" in err
    code, out, err = run_cli(capsys, "search", "--study", name, "--storage", db, "--granularity", "linear")
    assert code == 2 and "searches block genes" in err


def test_bad_input_is_one_line(tmp_path, capsys):
    db = str(tmp_path / "bad.db")
    run_search(SearchSettings(study_name="s", population=8, trials=8), synthetic_profile(blocks=3, granularity="block"),
               db)
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
    run_search(SearchSettings(study_name="s", population=8, trials=8), synthetic_profile(blocks=3, granularity="block"),
               db)
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
