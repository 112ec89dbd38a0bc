"""Hostile input to `empas search` / `front` / `studies`: absurd and non-finite numbers, garbage strings,
unknown or damaged studies, non-UTF-8 text files.

Every run either works or prints exactly one `empas: error:` line with exit 2, and a refused run leaves
the study as it was (same trials, same stored attributes). Case counts are in docs/reliability.md.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli_helpers import assert_one_line_error, run_cli, run_search, seed_synthetic_study
from search.settings import SearchError, SearchSettings
from search.synthetic import synthetic_profile

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
P = 8

GARBAGE = st.sampled_from(["nan", "NaN", "inf", "-inf", "1e400", "-1e400", "0x10", "", " ", "abc", "1_000",
                           "8.5", "٣", "--", "1e-400", "2**64", "\u00a0"])
HUGE_INT = st.integers(min_value=-(10**30), max_value=10**30).map(str)
FLOATS = st.floats(allow_nan=True, allow_infinity=True).map(repr)


def option(flag, values):
    return st.one_of(st.none(), values).map(lambda v: [] if v is None else [f"{flag}={v}"])


search_options = st.tuples(
    option("--population", st.one_of(HUGE_INT, GARBAGE, st.just(str(P)))),
    # always given: the default (5000 trials) is a valid, long run
    st.one_of(st.integers(-(10**30), 0).map(str), st.integers(1, 2 * P).map(str), GARBAGE).map(
        lambda v: [f"--trials={v}"]),
    option("--max-mib", st.one_of(FLOATS, GARBAGE)),
    option("--min-avg-bits", st.one_of(FLOATS, GARBAGE)),
    option("--crossover-prob", st.one_of(FLOATS, GARBAGE)),
    option("--mutation-prob", st.one_of(FLOATS, GARBAGE)),
    option("--seed", st.one_of(HUGE_INT, GARBAGE)),
    option("--evaluate", st.sampled_from(["proxy", "measured", "MEASURED", "x"])),
    option("--params", st.sampled_from(["auto", "all", "front", "none"])),
).map(lambda parts: [a for p in parts for a in p])


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fuzz") / "fuzz.db")
    seed_synthetic_study(path, population=P)
    return path


def snapshot(db: str, name: str = "s"):
    """The study's trial count and stored attributes, read with plain sqlite3 from Optuna's schema
    (independent of EMPAS, and without opening a new Optuna storage per fuzz case)."""
    import sqlite3

    with sqlite3.connect(db) as conn:
        (sid,) = conn.execute("SELECT study_id FROM studies WHERE study_name = ?", (name,)).fetchone()
        (n_trials,) = conn.execute("SELECT COUNT(*) FROM trials WHERE study_id = ?", (sid,)).fetchone()
        attrs = dict(conn.execute("SELECT key, value_json FROM study_user_attributes WHERE study_id = ?", (sid,)))
    conn.close()
    return n_trials, attrs


COUNTS = {}


@FUZZ
@given(extra=search_options)
def test_fuzz_search_options(db, capsys, extra):
    before = snapshot(db)
    code, out, err = run_cli(capsys, "search", "--study", "s", "--storage", db, "--json", *extra)
    COUNTS["search"] = COUNTS.get("search", 0) + 1
    if code == 0:  # a valid run: whole generations added, valid JSON
        result = json.loads(out)
        assert result["trials_run"] % P == 0 and snapshot(db)[0] == before[0] + result["trials_run"]
        return
    assert_one_line_error(code, err)
    assert snapshot(db) == before, "a refused run must not change the study"


@FUZZ
@given(name=st.text(min_size=1, max_size=40).filter(lambda s: s != "s" and not s.startswith("-")))
def test_fuzz_unknown_study_names(db, capsys, name):
    code, out, err = run_cli(capsys, "front", "--study", name, "--storage", db)
    assert_one_line_error(code, err)
    assert "no study named" in err


@pytest.mark.parametrize("argv, message", [
    (["--trials", str(10**30), "--population", "1"], "2 or more"),
    (["--population", str(10**9)], "too large"),
    (["--population", "9"], "--population 8"),
    (["--max-mib", "nan"], "finite"),
    (["--max-mib", "inf"], "finite"),
    (["--min-avg-bits=-inf"], "finite"),
    (["--seed=-1"], "seed -1"),
    (["--seed", str(2**64)], "seed"),
    (["--crossover-prob", "nan"], "between 0 and 1"),
    (["--trials", "1e3"], "invalid int value"),
    # refused from the stored settings, before the model is loaded (the model does not even exist)
    (["--evaluate", "measured", "--model", "/no/such/model"], "created with --evaluate proxy"),
    (["--max-mib", "100", "--model", "/no/such/model"], "created without --max-mib"),
])
def test_absurd_numbers_are_refused(db, capsys, argv, message):
    before = snapshot(db)
    code, out, err = run_cli(capsys, "search", "--study", "s", "--storage", db, *argv)
    assert_one_line_error(code, err)
    assert message in err
    assert snapshot(db) == before


def test_new_study_with_absurd_population_is_refused(tmp_path):
    db = str(tmp_path / "new.db")
    for kwargs in ({"population": 10**9}, {"max_mib": float("inf")}, {"min_avg_bits": float("nan")},
                   {"seed": 2**40}):
        with pytest.raises(SearchError):
            run_search(SearchSettings(study_name="n", trials=10, **kwargs), synthetic_profile(blocks=3), db)
    import optuna

    assert optuna.get_all_study_names(f"sqlite:///{db}") == []  # refused before anything was created


# -- studies EMPAS did not write, or damaged ------------------------------------------------------------

def _damage(db: str, name: str, attrs: dict) -> None:
    from storage import studies as stt
    from storage.database import open_database

    storage = open_database(db).optuna
    stt.set_study_user_attrs(storage, storage.get_study_id_from_name(name), attrs)


DAMAGE = {
    "profile-not-json": {"empas:profile": {"chunks": 1, "chars": 5}, "empas:profile:0": "{nope"},
    "profile-wrong-types": {"empas:profile": {"chunks": 1, "chars": 11}, "empas:profile:0": '{"bits": 5}'},
    "profile-missing-chunk": {"empas:profile": {"chunks": 3, "chars": 5}},
    "profile-head-garbage": {"empas:profile": {"chunks": "x"}},
    "settings-not-a-dict": {"empas:settings": "garbage"},
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_empas_study_is_one_line(tmp_path, capsys, damage):
    db = str(tmp_path / "dmg.db")
    seed_synthetic_study(db, population=P)
    _damage(db, "s", DAMAGE[damage])
    before = snapshot(db)
    for argv in (["search", "--study", "s", "--storage", db, "--trials", "8"], ["front", "--study", "s", "--storage", db]):
        code, out, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err)
        assert "damaged" in err or "not an EMPAS study" in err, err
    assert snapshot(db) == before
    code, out, err = run_cli(capsys, "studies", "--storage", db)  # the listing still works
    assert code == 0 and "s" in out


@pytest.mark.parametrize("with_trials", [True, False])
def test_plain_optuna_study_is_refused_and_kept(tmp_path, capsys, with_trials):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = str(tmp_path / "plain.db")
    study = optuna.create_study(study_name="plain", storage=f"sqlite:///{db}", directions=["minimize", "minimize"])
    if with_trials:
        study.optimize(lambda t: (t.suggest_float("x", 0, 1), t.suggest_int("y", 0, 3)), n_trials=5)
    for argv in (["search", "--study", "plain", "--storage", db, "--trials", "8"],
                 ["front", "--study", "plain", "--storage", db]):
        code, out, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err)
        assert "not an EMPAS study" in err
    assert len(optuna.load_study(study_name="plain", storage=f"sqlite:///{db}").trials) == (5 if with_trials else 0)
    code, out, err = run_cli(capsys, "studies", "--storage", db)
    assert code == 0 and "(not EMPAS)" in out


# -- text files ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"\xff\xfe\x00\x00bad", "caf\u00e9 latin-1 ".encode("latin-1") * 50, b"",
                                     b"\x00" * 100, bytes(range(256)) * 4])
def test_non_utf8_text_file_is_one_line(tiny_model_dir, tmp_path, capsys, content):
    text = tmp_path / "corpus.txt"
    text.write_bytes(content)
    db = str(tmp_path / "t.db")
    code, out, err = run_cli(capsys, "search", "--model", str(tiny_model_dir), "--quantizer", "rtn", "--text", str(text),
                             "--storage", db, "--calib-tokens", "64", "--heldout-tokens", "64", "--seq-len", "32",
                             "--trials", "8")
    assert_one_line_error(code, err)
    import optuna

    assert optuna.get_all_study_names(f"sqlite:///{db}") == []  # nothing created
