"""Storage: URL handling and the profile store on SQLite and PostgreSQL."""

import json

import pytest

from storage.artifacts import Artifact, ArtifactError, load_artifact, save_artifact
from storage.database import open_database
from storage.urls import StorageError, check_reachable, redact, resolve_storage_url


def test_resolve_and_redact(tmp_path, monkeypatch):
    monkeypatch.delenv("EMPAS_STORAGE", raising=False)
    assert resolve_storage_url(None) == "sqlite:///empas.db"
    monkeypatch.setenv("EMPAS_STORAGE", str(tmp_path / "x.db"))
    assert resolve_storage_url(None) == f"sqlite:///{tmp_path / 'x.db'}"
    assert resolve_storage_url("postgresql://a@b/c") == "postgresql://a@b/c"
    assert redact("postgresql://bob:hunter2@db:5432/x") == "postgresql://bob:***@db:5432/x"
    assert redact("sqlite:///a.db") == "sqlite:///a.db"


def test_unreachable_storage_is_one_line():
    with pytest.raises(StorageError) as err:
        check_reachable("postgresql+psycopg://bob:hunter2@127.0.0.1:1/db")
    assert "hunter2" not in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(StorageError):
        check_reachable("notadb://x")


def test_profile_store_round_trip(storage_url):
    db = open_database(storage_url)
    store = db.profiles
    header = {"model_id": "m", "model_fingerprint": "f" * 64, "corpus_fingerprint": "c", "granularity": "block",
              "metric": "kl", "base_loss": 3.0}
    store.ensure_header("k1", header)
    store.ensure_header("k1", header)  # idempotent
    store.add_entries("k1", {(0, "2"): 0.5, (0, "q4_k"): 0.1}, seconds=1.5)
    store.add_entries("k1", {(0, "2"): 0.5, (1, "2"): 0.7}, seconds=2.0)  # re-adding a finished entry is harmless
    assert store.entries("k1") == {(0, "2"): 0.5, (0, "q4_k"): 0.1, (1, "2"): 0.7}
    assert store.measured_seconds("k1") == pytest.approx(5.0)
    assert store.header("k1")["base_loss"] == 3.0
    db.close()
    again = open_database(storage_url).profiles
    assert again is not store  # a closed database is opened anew
    assert [p["key"] for p in again.list_profiles()] == ["k1"]
    assert again.list_profiles()[0]["entries"] == 3


def test_database_is_opened_once_per_url(tmp_path):
    url = f"sqlite:///{tmp_path / 'once.db'}"
    a, b = open_database(url), open_database(str(tmp_path / "once.db"))
    assert a is b and a.profiles is b.profiles and a.engine is a.optuna.engine


def test_read_only_commands_do_not_create_a_database(tmp_path):
    with pytest.raises(StorageError, match="no storage at"):
        open_database(str(tmp_path / "nope.db"), create=False)
    assert not (tmp_path / "nope.db").exists()


def make_artifact(**kw):
    base = dict(archetype="balanced", model_id="default", model_fingerprint="ab" * 32,
                quantizer={"name": "rtn", "group_size": 64}, granularity="block",
                genes={"block.0": "4", "block.1": "16"}, memory_bytes=123456,
                metrics={"predicted": {"ppl": 30.1}}, source={"study": "s", "trial": 3})
    base.update(kw)
    return Artifact(**base)


def test_artifact_round_trip_and_atomic(tmp_path):
    path = save_artifact(make_artifact(), tmp_path / "a" / "balanced.json")
    loaded = load_artifact(path)
    assert loaded.genes == {"block.0": "4", "block.1": "16"} and loaded.memory_bytes == 123456
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # the usual permissions, not mkstemp's private ones
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["balanced.json"]
    with pytest.raises(ArtifactError, match="made for model"):
        loaded.check_model("cd" * 32)
    loaded.check_model("ab" * 32)


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: "{" + json.dumps(d)[1:-20], "not valid JSON"),
    (lambda d: json.dumps({**d, "schema": "empas.artifact/99"}), "unknown schema"),
    (lambda d: json.dumps({**d, "genes": {"block.0": 9}}), "invalid qtype"),
    (lambda d: json.dumps({**d, "genes": {"block.0": "Q4 K!"}}), "invalid qtype"),
    (lambda d: json.dumps({**d, "memory_bytes": -1}), "memory_bytes"),
    (lambda d: json.dumps(d).replace("123456", "NaN"), "not valid JSON"),
    (lambda d: json.dumps([d]), "not an object"),
    (lambda d: json.dumps({**d, "quantizer": {"group_size": 0}}), "quantizer"),
    (lambda d: json.dumps({**d, "quantizer": {"name": "rtn", "group_size": 0}}), "group size"),
])
def test_bad_artifacts_are_refused(tmp_path, mutate, needle):
    d = make_artifact().to_dict()
    p = tmp_path / "bad.json"
    p.write_text(mutate(d))
    with pytest.raises(ArtifactError, match=needle):
        load_artifact(p)


def test_non_utf8_artifact(tmp_path):
    p = tmp_path / "bin.json"
    p.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_artifact(p)


def test_concurrent_first_open_creates_tables_once(tmp_path):
    import threading

    url = f"sqlite:///{tmp_path / 'race.db'}"
    errors = []

    def open_store():
        try:
            from storage.database import Database, _open_rdb

            Database(url, _open_rdb(url)).profiles.add_entries("k", {})  # each thread its own engine
        except Exception as exc:  # noqa: BLE001 - the assertion reports it
            errors.append(repr(exc))

    threads = [threading.Thread(target=open_store) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
