"""Benchmark of the persistent NSGA-II search (issue 3): persistence approaches, time to 5,000 trials,
hypervolume vs the exact front, dashboard load time.

    python bench/bench_search.py               # SmolLM2-135M's real linear profile (bench/data, 210 genes)
    python bench/bench_search.py --synthetic   # a synthetic profile with the same shapes instead

Writes bench/results/search.json and prints a table. Every approach runs in this process, on the same
profile and machine; the naive and add_trial baselines run fewer trials (they are 10-100x slower) and are
reported per trial. Timings on a shared machine vary: the load average is recorded with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import optuna  # noqa: E402

from search.space import SearchSpace  # noqa: E402
from search.study import SearchSettings, exact_points, run_search  # noqa: E402
from search.synthetic import synthetic_profile  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)
POP = 50
REAL_PROFILE = Path(__file__).resolve().parent / "data" / "smollm2_linear_128tok.profile.json"


# -- the baselines: Optuna's own write paths ------------------------------------------------------

def objective_factory(profile):
    space = SearchSpace.from_profile(profile)

    def objective(trial):
        bits = [trial.suggest_categorical(n, profile.bits) for n in profile.gene_names]
        idx = space.indices(bits)
        return float(space.predicted_loss(idx)), float(space.memory_bytes(idx))

    return objective, space


def naive_rdb(profile, url, n):
    """study.optimize with NSGAIISampler straight on the RDB storage (a commit per suggest)."""
    objective, _ = objective_factory(profile)
    study = optuna.create_study(storage=url, study_name="naive", directions=["minimize"] * 2,
                                sampler=optuna.samplers.NSGAIISampler(population_size=POP, seed=0))
    t = time.perf_counter()
    study.optimize(objective, n_trials=n)
    return time.perf_counter() - t


def memory_then_add_trial(profile, storage, n, compact: bool, name: str):
    """NSGA-II ask/tell in memory, then add_trial of each finished trial into ``storage``."""
    from optuna.trial import FrozenTrial

    objective, _ = objective_factory(profile)
    mem = optuna.create_study(directions=["minimize"] * 2,
                              sampler=optuna.samplers.NSGAIISampler(population_size=POP, seed=0))
    target = optuna.create_study(storage=storage, study_name=name, directions=["minimize"] * 2)
    t = time.perf_counter()
    for _ in range(n):
        trial = mem.ask()
        mem.tell(trial, objective(trial))
        tr = mem.get_trials(deepcopy=False)[-1]
        if compact:
            tr = FrozenTrial(number=0, state=tr.state, value=None, values=tr.values, datetime_start=tr.datetime_start,
                             datetime_complete=tr.datetime_complete, params={}, distributions={},
                             user_attrs={"bits": ",".join(str(tr.params[g]) for g in profile.gene_names)},
                             system_attrs=tr.system_attrs, intermediate_values={}, trial_id=-1)
        target.add_trial(tr)
    return time.perf_counter() - t


def memory_only(profile, n):
    objective, _ = objective_factory(profile)
    mem = optuna.create_study(directions=["minimize"] * 2,
                              sampler=optuna.samplers.NSGAIISampler(population_size=POP, seed=0))
    t = time.perf_counter()
    for _ in range(n):
        trial = mem.ask()
        mem.tell(trial, objective(trial))
    return time.perf_counter() - t


# -- EMPAS runs -----------------------------------------------------------------------------------

def empas_run(profile, url, trials, params="auto", seed_front=None, name=None):
    hv: dict[int, float] = {}
    fronts: dict[int, list] = {}

    def progress(event):
        if event.kind == "generation":
            done_generations = event.generation + 1
            hv[done_generations] = event.hypervolume_ratio
            if done_generations in (1, 10, 50, 100):
                fronts[done_generations] = event.front

    result = run_search(SearchSettings(study_name=name, population=POP, trials=trials, params=params,
                                       seed_front=seed_front), profile, url, progress=progress)
    return result, hv, fronts


def budget_gaps(space, exact, front, fractions=(0.3, 0.5, 0.7)):
    """At memory budgets between the smallest and the largest model: the best predicted KL (loss minus
    base) NSGA-II found under the budget, relative to the exact front's best under the same budget."""
    lo, hi = min(p.memory_bytes for p in exact), max(p.memory_bytes for p in exact)
    out = {}
    for f in fractions:
        budget = lo + f * (hi - lo)
        best_exact = min(p.predicted_loss for p in exact if p.memory_bytes <= budget) - space.base_loss
        found = [p.predicted_loss for p in front if p.memory_bytes <= budget]
        out[f"{f:.1f}"] = None if not found else (min(found) - space.base_loss) / best_exact - 1.0
    return out


def dashboard_seconds(url: str, study_name: str, fast: bool) -> list[float]:
    """Seconds for optuna-dashboard's study endpoint (what the page loads), twice, over HTTP on loopback."""
    import optuna_dashboard

    from search.dashboard import start_dashboard

    if fast:
        server = start_dashboard(url, 0)
    else:  # optuna-dashboard on Optuna's own RDBStorage, as `optuna-dashboard URL` would run it
        import threading
        from wsgiref.simple_server import make_server

        from search.dashboard import DashboardServer, _QuietHandler, _ThreadingWSGIServer

        srv = make_server("127.0.0.1", 0, optuna_dashboard.wsgi(url), server_class=_ThreadingWSGIServer,
                          handler_class=_QuietHandler)
        th = threading.Thread(target=srv.serve_forever, daemon=True)
        th.start()
        server = DashboardServer(srv, th, srv.server_port)
    try:
        base = f"http://127.0.0.1:{server.port}"
        studies = json.load(urllib.request.urlopen(base + "/api/studies", timeout=600))["study_summaries"]
        sid = next(s["study_id"] for s in studies if s["study_name"] == study_name)
        times = []
        for _ in range(2):
            t = time.perf_counter()
            body = urllib.request.urlopen(f"{base}/api/studies/{sid}", timeout=600).read()
            times.append(time.perf_counter() - t)
        times.append(len(body))
        return times
    finally:
        server.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile-json", default=str(REAL_PROFILE),
                    help="a Profile.to_dict() JSON file (default: SmolLM2-135M linear, 128 calibration tokens)")
    ap.add_argument("--synthetic", action="store_true", help="use the synthetic SmolLM2-shaped profile")
    ap.add_argument("--dashboard-all-params", action="store_true",
                    help="also time the dashboard on the 5,000 x 210-param study (minutes)")
    ap.add_argument("--trials", type=int, default=5000)
    ap.add_argument("--naive-trials", type=int, default=10)
    ap.add_argument("--add-trials", type=int, default=40)
    ap.add_argument("--all-params-trials", type=int, default=5000)
    ap.add_argument("--skip-plain-dashboard", action="store_true",
                    help="skip optuna-dashboard on Optuna's own storage (slow: minutes)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "search.json"))
    args = ap.parse_args()

    if not args.synthetic and Path(args.profile_json).is_file():
        from profiling.profile import Profile

        profile = Profile.from_dict(json.loads(Path(args.profile_json).read_text()))
        source = (f"real profile of {profile.model_id} ({profile.granularity}, {profile.metric}, "
                  f"{profile.calibration_tokens} calibration tokens) from {Path(args.profile_json).name}")
    else:
        profile = synthetic_profile(granularity="linear")
        source = "synthetic SmolLM2-135M-shaped profile (real shapes and byte costs, made-up sensitivities)"
    block = synthetic_profile(granularity="block")  # no real block profile is stored: synthetic, same shapes
    space = SearchSpace.from_profile(profile)
    tmp = Path(tempfile.mkdtemp(prefix="empas-bench-"))
    out: dict = {"profile": source, "genes": profile.n_genes, "bits": profile.bits, "population": POP,
                 "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                             "optuna": optuna.__version__, "load_before": os.getloadavg()}}
    rows = []

    def row(approach, trials, seconds, note=""):
        per = seconds / trials
        rows.append({"approach": approach, "trials": trials, "seconds": seconds, "ms_per_trial": per * 1e3,
                     "trials_per_s": 1 / per, "extrapolated_5000_s": per * 5000, "note": note})
        print(f"  {approach:44} {trials:6d} trials {seconds:8.1f}s  {per * 1e3:8.1f} ms/trial", flush=True)

    print(f"profile: {source}; {profile.n_genes} genes", flush=True)
    print("persistence approaches (210 genes, NSGA-II population 50):", flush=True)
    row("Optuna naive: optimize() on SQLite", args.naive_trials,
        naive_rdb(profile, f"sqlite:///{tmp / 'naive.db'}", args.naive_trials), "commit per suggest")
    row("Optuna in-memory ask/tell only (no persistence)", 500, memory_only(profile, 500), "lower bound of that path")
    row("Optuna in-memory + add_trial (params) SQLite", args.add_trials,
        memory_then_add_trial(profile, f"sqlite:///{tmp / 'add.db'}", args.add_trials, False, "add"))
    row("Optuna in-memory + add_trial (compact attr) SQLite", args.add_trials * 3,
        memory_then_add_trial(profile, f"sqlite:///{tmp / 'addc.db'}", args.add_trials * 3, True, "addc"))
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    row("Optuna in-memory + add_trial (params) journal file", args.add_trials * 3,
        memory_then_add_trial(profile, JournalStorage(JournalFileBackend(str(tmp / "j.log"))), args.add_trials * 3,
                              False, "journal"))
    all_url = f"sqlite:///{tmp / 'all.db'}"
    r_all, _, _ = empas_run(profile, all_url, args.all_params_trials, params="all", name="all-params")
    row("EMPAS: sampler per generation, bulk insert, every trial as params", r_all.trials_run, r_all.seconds)
    main_url = f"sqlite:///{tmp / 'main.db'}"
    r_main, hv_seeded, fronts_seeded = empas_run(profile, main_url, args.trials, name="linear")
    row("EMPAS: same, front as params, others compact (chosen)", r_main.trials_run, r_main.seconds,
        f"{r_main.params_trials} trials with params")
    block_url = f"sqlite:///{tmp / 'block.db'}"
    r_block, _, _ = empas_run(block, block_url, args.trials, name="block")
    out["block"] = {"genes": block.n_genes, "trials": r_block.trials_run, "seconds": r_block.seconds,
                    "params_trials": r_block.params_trials}
    print(f"  block granularity ({block.n_genes} genes), every trial as params: {r_block.trials_run} trials in "
          f"{r_block.seconds:.1f}s", flush=True)
    out["approaches"] = rows
    out["time_to_5000"] = {"linear_front_params": r_main.seconds if r_main.trials_run == 5000 else None,
                           "linear_all_params": r_all.seconds if r_all.trials_run == 5000 else None,
                           "block_all_params": r_block.seconds if r_block.trials_run == 5000 else None,
                           "params_trials_linear": r_main.params_trials, "front_points_linear": len(r_main.front)}

    # hypervolume vs the exact front, with and without exact-front seeds
    r_unseeded, hv_unseeded, fronts_unseeded = empas_run(profile, f"sqlite:///{tmp / 'unseeded.db'}", args.trials,
                                                         seed_front=0, name="unseeded")
    exact = exact_points(space)
    hv_table = {}
    for label, hv, fronts in ((f"seeded (uniform + {POP // 4} exact-front points)", hv_seeded, fronts_seeded),
                              ("unseeded (uniform genomes only)", hv_unseeded, fronts_unseeded)):
        hv_table[label] = {str(g): {"hypervolume_ratio": hv.get(g),
                                    "kl_excess_at_budget": budget_gaps(space, exact, fronts[g]) if g in fronts else None}
                           for g in (1, 10, 50, 100)}
    out["hypervolume"] = {"exact_front_points": len(exact), "reference": "normalised by the exact front's ideal "
                          "and nadir, reference point 1.1 x nadir", "runs": hv_table}
    print("\nhypervolume ratio NSGA-II / exact front (after N generations of 50):", flush=True)
    for label, table in hv_table.items():
        cells = "  ".join(f"{g}: {v['hypervolume_ratio']:.4f}" for g, v in table.items() if v["hypervolume_ratio"])
        print(f"  {label:42} {cells}", flush=True)
        for g, v in table.items():
            if v["kl_excess_at_budget"]:
                gaps = ", ".join(f"{f}: {'-' if x is None else f'{100 * x:+.1f}%'}"
                                 for f, x in v["kl_excess_at_budget"].items())
                print(f"      gen {g:>3}: predicted-KL excess over exact at memory budgets (fraction of range) {gaps}")

    # readability and resume
    t = time.perf_counter()
    trials = optuna.load_study(study_name="linear", storage=main_url).trials
    best = optuna.load_study(study_name="linear", storage=main_url).best_trials
    out["plain_optuna"] = {"load_trials_seconds": time.perf_counter() - t, "trials": len(trials),
                           "best_trials": len(best),
                           "best_trials_all_params": all(len(b.params) == profile.n_genes for b in best)}
    resumed = run_search(SearchSettings(study_name="linear", trials=500), profile, main_url)
    out["resume"] = {"first_generation": resumed.first_generation, "last_generation": resumed.last_generation,
                     "trials_total": resumed.trials_total, "seconds": resumed.seconds}
    print(f"\nplain optuna.load_study(...).trials: {len(trials)} trials in "
          f"{out['plain_optuna']['load_trials_seconds']:.1f}s; best_trials {len(best)}, all with "
          f"{profile.n_genes} params: {out['plain_optuna']['best_trials_all_params']}")
    print(f"resume: generations {resumed.first_generation}..{resumed.last_generation}, "
          f"{resumed.trials_total} trials in the study", flush=True)

    out["db_bytes"] = {"linear_front_params": (tmp / "main.db").stat().st_size,
                       "linear_all_params": (tmp / "all.db").stat().st_size, "block": (tmp / "block.db").stat().st_size}
    from storage.studies import open_fast_read_storage, open_storage

    reads = {}
    for label, opener in (("optuna_orm", open_storage), ("empas_columnwise", open_fast_read_storage)):
        st = opener(main_url)
        t = time.perf_counter()
        n = len(st.get_all_trials(st.get_study_id_from_name("linear"), deepcopy=False))
        reads[label] = time.perf_counter() - t
    out["get_all_trials_seconds"] = reads
    print(f"study sizes: {out['db_bytes']}; get_all_trials of {n} trials: Optuna's ORM {reads['optuna_orm']:.2f}s, "
          f"column-wise {reads['empas_columnwise']:.2f}s", flush=True)

    # dashboard load (study endpoint, over HTTP on loopback)
    dash = {}
    for label, url, name in (("linear, front as params", main_url, "linear"),
                             ("block, all params", block_url, "block"),
                             ("linear, all params", all_url, "all-params")):
        if name == "all-params" and not args.dashboard_all_params:
            continue
        fast = dashboard_seconds(url, name, fast=True)
        entry = {"empas_dashboard_first_s": fast[0], "empas_dashboard_second_s": fast[1], "bytes": fast[2]}
        if not args.skip_plain_dashboard and name != "all-params":
            plain = dashboard_seconds(url, name, fast=False)
            entry.update({"plain_optuna_storage_first_s": plain[0], "plain_optuna_storage_second_s": plain[1]})
        dash[label] = entry
        print(f"dashboard {label:26} empas dashboard: {fast[0]:6.1f}s first, {fast[1]:6.1f}s again, "
              f"{fast[2] / 1e6:.0f} MB" + (f"; optuna's own storage: {entry['plain_optuna_storage_first_s']:.1f}s"
                                          if "plain_optuna_storage_first_s" in entry else ""), flush=True)
    out["dashboard"] = dash
    out["machine"]["load_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"\nwrote {args.out}; load average before {out['machine']['load_before']}, "
          f"after {out['machine']['load_after']}")


if __name__ == "__main__":
    main()
