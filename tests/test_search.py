"""The persistent NSGA-II search: Optuna compatibility, seeds, resume, constraints, refusals, stops."""

import json
import threading
import urllib.request

import numpy as np
import optuna
import pytest

from search import catalogue, nsga
from search.hypervolume import FrontScale, hypervolume_2d, sweep_2d
from search.settings import SearchError, SearchSettings
from search.study_record import default_study_name
from search.synthetic import synthetic_profile
from storage.database import open_database
from storage.studies import GENOME_ATTR, fast_read_storage, get_study_json, set_study_json
from storage.urls import StorageError


# The engine takes an opened Database; these tests name storages by URL.
def run_search(settings, profile, url, **kw):
    return nsga.run_search(settings, profile, open_database(url), **kw)


def load_front(url, name):
    return catalogue.load_front(open_database(url), name)


def study_info(url, name):
    return catalogue.study_info(open_database(url), name)


def list_studies(url):
    return catalogue.list_studies(open_database(url))


def delete_study(url, name):
    return catalogue.delete_study(open_database(url), name)


def open_storage(url):
    return open_database(url).optuna


def open_fast_read_storage(url):
    return fast_read_storage(open_database(url))

GEN = "NSGAIISampler:generation"


@pytest.fixture
def db(tmp_path):
    return f"sqlite:///{tmp_path / 'search.db'}"


def small_profile(blocks=4, granularity="block", bits=(2, 4, 8, 16), seed=0, **kw):
    return synthetic_profile(blocks=blocks, granularity=granularity, bits=bits, seed=seed, **kw)


def load(db, name):
    return optuna.load_study(study_name=name, storage=db)


def system_attrs(db, name):
    storage = open_storage(db)  # Optuna 5 has no public Study.system_attrs
    return storage.get_study_system_attrs(storage.get_study_id_from_name(name))


def test_study_is_plain_optuna_with_generations_params_and_seeds(db):
    profile = small_profile(blocks=6)
    result = run_search(SearchSettings(population=10, trials=50, seed_front=3), profile, db)
    assert result.trials_run == 50 and result.first_generation == 0 and result.last_generation == 4
    study = load(db, result.study_name)
    trials = study.trials
    assert [t.number for t in trials] == list(range(50))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert [t.system_attrs[GEN] for t in trials] == [g for g in range(5) for _ in range(10)]
    # block granularity: every trial carries one categorical param per gene, named after the gene
    for t in trials:
        assert list(t.params) == profile.gene_names
        assert t.distributions[profile.gene_names[0]] == optuna.distributions.CategoricalDistribution(profile.qtypes)
        assert t.user_attrs[GENOME_ATTR] == ",".join(str(t.params[n]) for n in profile.gene_names)
        assert t.values[0] == pytest.approx(profile.predicted_loss(list(t.params.values())))
        assert t.values[1] == profile.memory_bytes(list(t.params.values()))
    assert study.metric_names == ["predicted_loss", "memory_bytes"]
    # the seeds: every uniform genome opens generation 0, and NSGA-II selects from them
    uniform = {b: next(t for t in trials if set(t.params.values()) == {b}) for b in profile.qtypes}
    assert all(t.system_attrs[GEN] == 0 for t in uniform.values())
    parents = set(system_attrs(db, result.study_name)["NSGAIISampler:parent:1"])
    assert uniform["16"]._trial_id in parents  # the loss minimum is always on the first front
    assert uniform["2"]._trial_id in parents  # and so is the memory minimum
    # the study is self-contained
    attrs = study.user_attrs
    assert attrs["empas:model_fingerprint"] == profile.model_fingerprint
    assert attrs["empas:settings"]["population"] == 10
    stored = get_study_json(attrs, "empas:profile")
    np.testing.assert_array_equal(stored["sensitivity"], profile.sensitivity)


def test_linear_granularity_keeps_the_front_as_params(db):
    profile = small_profile(blocks=10, granularity="linear")  # 70 genes > the all-params limit
    result = run_search(SearchSettings(population=12, trials=120), profile, db)
    study = load(db, result.study_name)
    with_params = [t for t in study.trials if t.params]
    assert 0 < len(with_params) < 120
    best = study.best_trials
    assert best and all(list(t.params) == profile.gene_names for t in best)
    # compact trials still carry their genome
    for t in study.trials:
        bits = t.user_attrs[GENOME_ATTR].split(",")
        assert t.values[1] == profile.memory_bytes(bits)
    front = load_front(db, result.study_name)
    # the front lists each distinct point once (the first trial that reached it); Optuna lists copies too
    first_of_each = {}
    for t in sorted(best, key=lambda t: t.number):
        first_of_each.setdefault(tuple(t.values), t.number)
    assert sorted(p.trial_number for p in front.points) == sorted(first_of_each.values())
    assert len(front.points) == len(result.front) == list_studies(db)[0]["front_size"]


def test_resume_continues_generations_and_plain_optuna_can_continue(db):
    profile = small_profile()
    first = run_search(SearchSettings(population=8, trials=24), profile, db)
    again = run_search(SearchSettings(trials=16), profile, db)  # population comes from the study
    assert again.resumed and again.first_generation == 3 and again.last_generation == 4
    assert again.trials_total == 40
    study = load(db, first.study_name)
    gens = [t.system_attrs[GEN] for t in study.trials]
    assert gens == [g for g in range(5) for _ in range(8)]
    assert "NSGAIISampler:parent:4" in system_attrs(db, first.study_name)
    # Optuna's own NSGA-II picks the study up where EMPAS left it (block granularity: params everywhere)
    plain = optuna.load_study(study_name=first.study_name, storage=db,
                              sampler=optuna.samplers.NSGAIISampler(population_size=8, seed=1))

    def objective(trial):
        bits = [trial.suggest_categorical(n, profile.qtypes) for n in profile.gene_names]
        return profile.predicted_loss(bits), profile.memory_bytes(bits)

    plain.optimize(objective, n_trials=8)
    assert [t.system_attrs[GEN] for t in plain.trials[-8:]] == [5] * 8
    third = run_search(SearchSettings(trials=8), profile, db)
    assert third.first_generation == 6 and third.trials_total == 56


def test_partial_generation_is_completed_on_resume(db):
    profile = small_profile()
    stop = threading.Event()
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > 1  # one generation, then stop

    r = run_search(SearchSettings(population=8, trials=40), profile, db, should_stop=should_stop)
    assert r.stopped and r.trials_run == 8
    study = load(db, r.study_name)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    del stop
    r2 = run_search(SearchSettings(trials=8), profile, db)
    assert r2.first_generation == 1 and r2.trials_total == 16


def test_constraints_are_respected_and_infeasible_trials_kept(db):
    profile = small_profile(blocks=6)
    lo = profile.memory_bytes(["2"] * profile.n_genes) / 2**20
    hi = profile.memory_bytes(["16"] * profile.n_genes) / 2**20
    max_mib = lo + 0.4 * (hi - lo)
    result = run_search(SearchSettings(population=10, trials=60, max_mib=max_mib), profile, db)
    study = load(db, result.study_name)
    infeasible = [t for t in study.trials if t.constraints["max_mib"] > 0]
    assert infeasible, "the 16-bit seed at least is over the limit and must be kept"
    assert all(t.values[1] / 2**20 > max_mib for t in infeasible)
    assert study.best_trials and all(t.values[1] / 2**20 <= max_mib for t in study.best_trials)
    assert all(p.memory_mib <= max_mib for p in result.front)
    assert all(p.memory_mib <= max_mib for p in load_front(db, result.study_name).points)
    with pytest.raises(SearchError, match="--max-mib"):
        run_search(SearchSettings(trials=10, max_mib=max_mib + 5), profile, db)
    with pytest.raises(SearchError, match="no genome meets"):
        run_search(SearchSettings(study_name="tiny", trials=10, max_mib=lo * 0.5), profile, db)
    assert study_info(db, "tiny") is None  # refused before anything was written


def test_min_average_bits_constraint(db):
    profile = small_profile(blocks=6)
    result = run_search(SearchSettings(population=10, trials=40, min_avg_bits=6.0), profile, db)
    assert result.front and all(p.average_bits >= 6.0 for p in result.front)


def test_refuses_other_model_genome_bits_and_population(db):
    profile = small_profile()
    run_search(SearchSettings(study_name="s", population=8, trials=8), profile, db)
    other_model = small_profile(seed=1)
    other_model.model_fingerprint = "another"
    with pytest.raises(SearchError, match="belongs to model"):
        run_search(SearchSettings(study_name="s", trials=8), other_model, db)
    other_genome = small_profile(blocks=5)
    other_genome.model_fingerprint = profile.model_fingerprint
    with pytest.raises(SearchError, match="genes"):
        run_search(SearchSettings(study_name="s", trials=8), other_genome, db)
    with pytest.raises(SearchError, match="uses 2,4,8,16"):
        run_search(SearchSettings(study_name="s", trials=8), small_profile(bits=(2, 4, 16)), db)
    with pytest.raises(SearchError, match="--population 8"):
        run_search(SearchSettings(study_name="s", trials=8, population=9), profile, db)
    with pytest.raises(SearchError, match="at least 2|2 or more"):
        run_search(SearchSettings(study_name="t", population=1), profile, db)
    with pytest.raises(SearchError, match="no study named"):
        load_front(db, "nope")
    with pytest.raises(SearchError, match="no study named"):
        delete_study(db, "nope")


def test_nsga2_hypervolume_approaches_the_exact_front(db):
    profile = small_profile(blocks=3, granularity="linear", seed=3)  # 21 genes
    ratios = []

    def progress(event):
        if event.kind == "generation":
            ratios.append(event.hypervolume_ratio)

    # no exact-front seeds: NSGA-II has to find the front itself (only the uniform genomes are seeded)
    result = run_search(SearchSettings(population=20, trials=400, seed_front=0), profile, db, progress=progress)
    assert len(ratios) == 20
    assert all(b >= a - 1e-12 for a, b in zip(ratios, ratios[1:]))  # the archive front only improves
    assert ratios[-1] > ratios[0] + 0.02
    assert result.hypervolume_ratio == pytest.approx(ratios[-1])
    assert 0.93 < result.hypervolume_ratio <= 1.0 + 1e-9


def test_hypervolume_matches_sweep():
    rng = np.random.default_rng(0)
    for _ in range(20):
        pts = rng.random((rng.integers(1, 40), 2))
        assert hypervolume_2d(pts, np.array([1.1, 1.1])) == pytest.approx(sweep_2d(pts, np.array([1.1, 1.1])))
    scale = FrontScale(np.array([1.0, 3.0]), np.array([10.0, 2.0]))
    assert scale.hypervolume([1.0, 3.0], [10.0, 2.0]) == pytest.approx(1.1 * 1.1 - 1.0)


def test_events_stop_and_nothing_running(db):
    profile = small_profile()
    stop = threading.Event()
    events = []

    def progress(event):
        events.append(event)
        if event.kind == "generation" and event.generation == 1:
            stop.set()

    result = run_search(SearchSettings(population=8, trials=80), profile, db, progress=progress, should_stop=stop)
    assert result.stopped and result.trials_run == 16
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "stopped" and kinds.count("generation") == 2
    gen = [e for e in events if e.kind == "generation"][-1]
    assert gen.trials_done == 16 and gen.trials_per_s > 0 and gen.front
    assert all(len(p.qtypes) == profile.n_genes for p in gen.front)
    states = {t.state for t in load(db, result.study_name).trials}
    assert states == {optuna.trial.TrialState.COMPLETE}


def test_list_delete_and_defaults(db):
    profile = small_profile()
    name = default_study_name(profile)
    assert name == "SmolLM2-135M-shapes-block-2.4.8.16"
    run_search(SearchSettings(population=8, trials=16), profile, db)
    rows = list_studies(db)
    assert [r["name"] for r in rows] == [name]
    row = rows[0]
    assert row["empas"] and row["trials_complete"] == 16 and row["n_genes"] == 4 and row["granularity"] == "block"
    assert row["front_size"] >= 1 and row["best_points"] and row["last_update"]
    delete_study(db, name)
    assert list_studies(db) == []
    assert optuna.get_all_study_names(db) == []


def test_default_names_mark_what_differs_from_the_quantisers_defaults():
    from search.study_record import study_name

    ggml = ("f16", "q8_0", "q6_k", "q5_1", "q5_0", "q5_k", "q4_1", "iq4_nl", "q4_0", "q4_k", "q3_k", "q2_k")
    assert study_name("default", "linear", "ggml", ggml, True, "kl") == "default-linear-ggml"
    assert study_name("default", "linear", "ggml", ggml, False, "kl") == "default-linear-ggml-noemb"
    assert study_name("default", "linear", "ggml", ("f16", "q8_0"), True, "fisher") == "default-linear-ggml-f16.q8_0-fisher"
    assert study_name("/m/tiny", "block", "rtn", ("4", "16"), True, "kl", "measured") == "tiny-block-4.16-emb-measured"


def test_chunked_json_attribute_roundtrip(db):
    storage = open_storage(db)
    sid = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "chunks")
    obj = {"a": list(range(500)), "b": "x" * 1000}
    set_study_json(storage, sid, "big", obj, chunk_chars=397)
    attrs = storage.get_study_user_attrs(sid)
    assert attrs["big"]["chunks"] > 5
    assert get_study_json(attrs, "big") == obj


def test_fast_reader_returns_optunas_trials(db):
    profile = small_profile(blocks=10, granularity="linear")
    lo = profile.memory_bytes(["2"] * profile.n_genes) / 2**20
    r = run_search(SearchSettings(population=10, trials=30, max_mib=lo * 1.5), profile, db)
    plain = open_storage(db)
    fast = open_fast_read_storage(db)
    sid = plain.get_study_id_from_name(r.study_name)
    assert fast.get_all_trials(sid) == plain.get_all_trials(sid)
    states = (optuna.trial.TrialState.COMPLETE,)
    assert fast.get_all_trials(sid, states=states) == plain.get_all_trials(sid, states=states)


def test_dashboard_serves_the_study(db):
    from search.dashboard import start_dashboard

    r = run_search(SearchSettings(population=8, trials=16), small_profile(), db)
    server = start_dashboard(db, 0)
    try:
        base = f"http://127.0.0.1:{server.port}"
        studies = json.load(urllib.request.urlopen(base + "/api/studies", timeout=30))["study_summaries"]
        assert [s["study_name"] for s in studies] == [r.study_name]
        endpoint = f"{base}/api/studies/{studies[0]['study_id']}"
        first = urllib.request.urlopen(endpoint, timeout=30).read()
        detail = json.loads(first)
        assert len(detail["trials"]) == 16 and detail["best_trials"]
        assert urllib.request.urlopen(endpoint, timeout=30).read() == first  # unchanged study: cached
        run_search(SearchSettings(study_name=r.study_name, trials=8), small_profile(), db)
        assert len(json.load(urllib.request.urlopen(endpoint, timeout=30))["trials"]) == 24  # new trials seen
    finally:
        server.shutdown()


def test_locked_database_is_one_line(db, monkeypatch, tmp_path):
    import sqlite3

    run_search(SearchSettings(study_name="s", population=8, trials=8), small_profile(), db)
    monkeypatch.setenv("EMPAS_SQLITE_TIMEOUT", "0.2")
    holder = sqlite3.connect(str(tmp_path / "search.db"), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StorageError, match="locked") as info:
            run_search(SearchSettings(study_name="s", trials=8), small_profile(), db)
        assert "\n" not in str(info.value)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with pytest.raises(StorageError, match="does not exist"):
        open_database(f"sqlite:///{tmp_path}/missing/dir/x.db")



def test_measured_mode_on_tiny_model(tiny_loaded, db, one_torch_thread):
    from conftest import rtn_settings
    from profiling.runner import PrefixRunner
    from profiling.sensitivity import prepare, run_profile

    setup = prepare(rtn_settings("2,4,16", calib_tokens=64, heldout_tokens=64), tiny_loaded)
    profile = run_profile(setup)
    runner = PrefixRunner(setup.loaded.model, setup.inventory, setup.tokens.calibration)

    def measure(qtypes):
        return runner.kl_with(setup.inventory.genes, qtypes, setup.quantizer)
    with pytest.raises(SearchError, match="needs the model"):
        run_search(SearchSettings(evaluate="measured", trials=4), profile, db)
    calls = {"n": 0}

    def stop_after_three():
        calls["n"] += 1
        return calls["n"] > 4  # checked before the run, then before each trial

    r = run_search(SearchSettings(evaluate="measured", population=4, trials=8), profile, db, measure=measure,
                   should_stop=stop_after_three)
    assert r.stopped and r.trials_run == 3 and r.study_name.endswith("-measured")
    r2 = run_search(SearchSettings(evaluate="measured", trials=5), profile, db, measure=measure)
    assert r2.first_generation == 0 and r2.trials_total == 8 and r2.hypervolume_ratio is None
    study = load(db, r.study_name)
    assert [t.system_attrs[GEN] for t in study.trials] == [0, 0, 0, 0, 1, 1, 1, 1]
    t = study.trials[-1]
    bits = t.user_attrs[GENOME_ATTR].split(",")
    kl = runner.kl_with(setup.inventory.genes, bits, setup.quantizer)
    assert t.values[0] == pytest.approx(profile.base_loss + kl, rel=1e-6)
    assert t.user_attrs["predicted_loss"] == pytest.approx(profile.predicted_loss(bits))
    front = load_front(db, r.study_name)
    assert front.evaluate == "measured" and all(p.measured is not None for p in front.points)


@pytest.mark.postgres
def test_postgres_roundtrip():
    """Same machinery on PostgreSQL (set EMPAS_TEST_POSTGRES_URL, e.g. postgresql://user@127.0.0.1/db)."""
    import os
    import uuid

    url = os.environ.get("EMPAS_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("EMPAS_TEST_POSTGRES_URL is not set")
    name = f"pg-{uuid.uuid4().hex[:8]}"
    profile = small_profile(blocks=10, granularity="linear")
    lo = profile.memory_bytes(["2"] * profile.n_genes) / 2**20
    try:
        first = run_search(SearchSettings(study_name=name, population=10, trials=30, max_mib=lo * 1.6), profile, url)
        again = run_search(SearchSettings(study_name=name, trials=20), profile, url)
        assert again.first_generation == 3 and again.trials_total == 50
        study = load(url, name)
        assert [t.number for t in study.trials] == list(range(50))
        assert study.best_trials and all(list(t.params) == profile.gene_names for t in study.best_trials)
        assert all(t.values[1] / 2**20 <= lo * 1.6 for t in study.best_trials)
        info = study_info(url, name)
        np.testing.assert_array_equal(info["profile"].sensitivity, profile.sensitivity)
        storage, fast = open_storage(url), open_fast_read_storage(url)
        sid = storage.get_study_id_from_name(name)
        assert fast.get_all_trials(sid) == storage.get_all_trials(sid)
        assert first.front and load_front(url, name).points
        assert name in [r["name"] for r in list_studies(url)]
    finally:
        if study_info(url, name) is not None:
            delete_study(url, name)
    assert study_info(url, name) is None
