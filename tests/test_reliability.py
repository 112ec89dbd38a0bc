"""Reliability: kill -9 of `empas search` and of an atomic writer, and 4 concurrent search workers on one
study (SQLite file and PostgreSQL).

Every check reads the study back from Optuna's tables with plain SQL, recomputes the Pareto front from
all COMPLETE trials independently of the engine's own reader, and at the end of each test checks that
plain ``optuna.load_study`` sees the same trials. The counts these tests see are recorded
in docs/reliability.md (``EMPAS_RELIABILITY_REPORT=path`` appends them as JSON lines).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import pytest

from cli_helpers import ROOT, cli_env, empas_process, run_search
from search.catalogue import load_front
from search.settings import SearchSettings
from search.synthetic import synthetic_profile
from storage.database import open_database
from storage.studies import GENOME_ATTR

P = 10  # population of the test studies
STUDY = "rel"
GEN = "NSGAIISampler:generation"


def profile():
    return synthetic_profile(blocks=4, granularity="linear")  # 28 genes, real SmolLM2 layer shapes


def record(kind: str, **data) -> None:
    path = os.environ.get("EMPAS_RELIABILITY_REPORT")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"test": kind, **data}) + "\n")


def seed_study(url: str) -> None:
    run_search(SearchSettings(study_name=STUDY, population=P, trials=P), profile(), url)


def weak_front(values: np.ndarray) -> set[int]:
    """Rows no other row dominates (<= in both objectives, < in one); written without the engine."""
    keep = set()
    for i, v in enumerate(values):
        dominated = np.any(np.all(values <= v, axis=1) & np.any(values < v, axis=1))
        if not dominated:
            keep.add(i)
    return keep


@dataclass(frozen=True)
class Trial:
    number: int
    state: str
    values: tuple
    generation: object
    genome: object


def read_trials(url: str) -> list[Trial]:
    """The study's trials straight from Optuna's tables with plain SQL: independent of EMPAS's reader,
    and fast enough to check after every kill (Optuna's FrozenTrials take seconds at 2,000 trials)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            sid = conn.execute(text("SELECT study_id FROM studies WHERE study_name = :n"), {"n": STUDY}).scalar_one()
            of_study = "JOIN trials t ON t.trial_id = a.trial_id WHERE t.study_id = :s"
            rows = conn.execute(text("SELECT trial_id, number, state FROM trials WHERE study_id = :s"), {"s": sid}).all()
            values: dict[int, dict] = {}
            for tid, objective, value in conn.execute(
                    text(f"SELECT a.trial_id, a.objective, a.value FROM trial_values a {of_study}"), {"s": sid}):
                values.setdefault(tid, {})[objective] = value
            gens = dict(conn.execute(text(f"SELECT a.trial_id, a.value_json FROM trial_system_attributes a {of_study} "
                                          f"AND a.key = :k"), {"s": sid, "k": GEN}).all())
            genomes = dict(conn.execute(text(f"SELECT a.trial_id, a.value_json FROM trial_user_attributes a {of_study} "
                                             f"AND a.key = :k"), {"s": sid, "k": GENOME_ATTR}).all())
    finally:
        engine.dispose()
    out = []
    for tid, number, state in rows:
        v = values.get(tid, {})
        out.append(Trial(number=number, state=str(getattr(state, "name", state)).rsplit(".", 1)[-1],
                         values=tuple(v[k] for k in sorted(v)), generation=json.loads(gens[tid]) if tid in gens else None,
                         genome=json.loads(genomes[tid]) if tid in genomes else None))
    return sorted(out, key=lambda t: t.number)


def distinct_front(trials: list[Trial]) -> dict[tuple, int]:
    """The front as EMPAS reports it: each distinct (loss, memory) of the weak front once, carried by
    the lowest-numbered trial that reached it."""
    values = np.array([t.values for t in trials], dtype=np.float64)
    first: dict[tuple, int] = {}
    for i in sorted(weak_front(values), key=lambda i: trials[i].number):
        first.setdefault(tuple(trials[i].values), trials[i].number)
    return first


def check_study(url: str, with_optuna: bool = False) -> dict:
    """The invariants a study must keep after crashes and concurrent writers; returns the counts.

    ``with_optuna``: also load the study with plain ``optuna.load_study`` and check that Optuna sees
    exactly these trials (numbers, states, values, generations, genomes)."""
    trials = read_trials(url)
    states = {}
    for t in trials:
        states[t.state] = states.get(t.state, 0) + 1
    numbers = [t.number for t in trials]
    duplicates = len(numbers) - len(set(numbers))
    assert states == {"COMPLETE": len(trials)}, states
    assert numbers == list(range(len(trials))), "trial numbers must be 0..n-1 without gaps or duplicates"
    gens = [t.generation for t in trials]
    assert all(isinstance(g, int) for g in gens)
    per_gen = np.bincount(gens)
    assert (per_gen[:-1] >= P).all() and per_gen[-1] > 0, "every generation but the last is full"
    for t in trials:
        assert len(t.values) == 2 and len(t.genome.split(",")) == 28
    expected = distinct_front(trials)
    front = load_front(open_database(url), STUDY)
    assert {p.trial_number for p in front.points} == set(expected.values())
    for p in front.points:  # each point is its trial: objectives and genome
        t = trials[p.trial_number]
        assert (p.predicted_loss, p.memory_bytes) == pytest.approx(t.values, rel=1e-12)
        assert ",".join(p.qtypes) == t.genome
    assert front.trials_complete == len(trials)
    if with_optuna:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        seen = [Trial(t.number, t.state.name, tuple(t.values), t.system_attrs.get(GEN), t.user_attrs.get(GENOME_ATTR))
                for t in optuna.load_study(study_name=STUDY, storage=url).get_trials(deepcopy=False)]
        assert seen == trials
    return {"complete": states.get("COMPLETE", 0), "failed": states.get("FAIL", 0), "duplicates": duplicates,
            "generations": len(per_gen), "max_per_generation": int(per_gen.max()), "front": len(expected)}


def n_trials(url: str) -> int:
    return len(read_trials(url))


# -- kill -9 ---------------------------------------------------------------------------------------

KILLS = int(os.environ.get("EMPAS_RELIABILITY_KILLS", 5))


def test_kill_9_search_loses_at_most_the_generation_in_flight(tmp_path):
    url = f"sqlite:///{tmp_path / 'crash.db'}"
    seed_study(url)
    rng = random.Random(7)
    added = []
    for k in range(KILLS):
        before = n_trials(url)
        proc = empas_process("search", "--study", STUDY, "--storage", url, "--trials", "100000000", "--json")
        # the CLI needs ~1-3 s to import; kill anywhere from start-up to deep into the search
        time.sleep(rng.uniform(0.5, 4.5))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        after = n_trials(url)
        assert (after - before) % P == 0, "a generation is written whole or not at all"
        added.append(after - before)
        counts = check_study(url)  # nothing RUNNING, numbers dense, front = what the complete trials imply
    # resume: the generation count continues after the last complete generation
    last_gen = counts["generations"] - 1
    proc = empas_process("search", "--study", STUDY, "--storage", url, "--trials", str(2 * P), "--json")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert result["first_generation"] == last_gen + 1 and result["last_generation"] == last_gen + 2
    assert "Traceback" not in err
    counts = check_study(url, with_optuna=True)
    assert counts["complete"] == P + sum(added) + 2 * P
    record("kill9_search", kills=KILLS, trials_added_per_run=added, **counts)


def test_kill_9_during_atomic_write_leaves_old_or_new_file(tmp_path):
    """The export command is not merged yet: this kills a child that writes a large JSON artifact with
    ``storage.atomic.atomic_write_text`` over and over, at random moments."""
    target = tmp_path / "artifact.json"
    child = (
        "import json, sys\n"
        "from storage.atomic import atomic_write_text\n"
        "i = 0\n"
        "while True:\n"
        "    i += 1\n"
        "    atomic_write_text(sys.argv[1], json.dumps({'i': i, 'pad': 'x' * 4_000_000, 'end': True}))\n"
        "    print(i, flush=True)\n")
    rng = random.Random(11)
    seen = []
    for _ in range(KILLS * 2):
        proc = subprocess.Popen([sys.executable, "-c", child, str(target)], cwd=ROOT, env=cli_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(0.05, 1.0))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        if target.exists():
            data = json.loads(target.read_text())  # never half-written
            assert data["end"] is True and len(data["pad"]) == 4_000_000
            seen.append(data["i"])
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != target.name]
    assert all(name.startswith(".artifact.json.tmp-") for name in leftovers)  # hidden temp files only
    record("kill9_atomic_write", kills=KILLS * 2, complete_files_seen=len(seen), stale_temp_files=len(leftovers))


# -- concurrent workers ------------------------------------------------------------------------------

WORKERS = 4
TRIALS_PER_WORKER = 15 * P


def test_four_concurrent_workers_on_one_study(storage_url):
    seed_study(storage_url)
    procs = [empas_process("search", "--study", STUDY, "--storage", storage_url, "--trials", str(TRIALS_PER_WORKER),
                   "--seed", str(100 + w), "--json") for w in range(WORKERS)]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err
        assert "Traceback" not in err and "locked" not in err and err.strip() == "", err
        assert json.loads(out)["trials_run"] == TRIALS_PER_WORKER
    counts = check_study(storage_url, with_optuna=True)
    assert counts["complete"] == P + WORKERS * TRIALS_PER_WORKER
    assert counts["failed"] == 0 and counts["duplicates"] == 0
    kind = storage_url.split(":", 1)[0].split("+")[0]
    record("four_workers", storage=kind, workers=WORKERS, trials_per_worker=TRIALS_PER_WORKER, **counts)


def test_four_workers_create_one_new_study(storage_url, tmp_path):
    """Four workers started at once on a study that does not exist yet: one creates it (in one
    transaction), the others join it as a resume; nobody fails, nothing is deleted."""
    profile_file = tmp_path / "profile.json"  # the workers read it: no quantiser (torch) to import
    profile_file.write_text(json.dumps(profile().to_dict()))
    code = ("import sys, json\n"
            "from profiling.profile import Profile\n"
            "from search.nsga import run_search\n"
            "from search.settings import SearchSettings\n"
            "from storage.database import open_database\n"
            "r = run_search(SearchSettings(study_name=sys.argv[2], population=10, trials=50, seed=int(sys.argv[3])),\n"
            "               Profile.from_dict(json.loads(open(sys.argv[4]).read())), open_database(sys.argv[1]))\n"
            "print(json.dumps({'resumed': r.resumed, 'run': r.trials_run}))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, storage_url, STUDY, str(w), str(profile_file)], cwd=ROOT,
                              env=cli_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in range(WORKERS)]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err
        assert err.strip() == "", err
    runs = [json.loads(out) for out, _ in results]
    assert sum(not r["resumed"] for r in runs) >= 1
    counts = check_study(storage_url, with_optuna=True)
    assert counts["complete"] == WORKERS * 50
    kind = storage_url.split(":", 1)[0].split("+")[0]
    record("four_workers_new_study", storage=kind, created=sum(not r["resumed"] for r in runs), **counts)
