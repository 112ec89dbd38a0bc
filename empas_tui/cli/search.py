"""``empas search``, ``empas front``, ``empas studies`` and ``empas dashboard``.

``search`` profiles first when needed (reusing the stored profile), then runs or resumes the NSGA-II
study; Ctrl-C finishes the current generation (the current trial in measured mode), saves it and exits.
"""

from __future__ import annotations

import getpass
import math
import socket
import sys
import threading

from . import signals
from .options import add_model_options, add_storage_option, explicit_profile_options, profile_settings
from .output import ProgressBar, print_json

FRONT_TABLE_ROWS = 20


def register(sub) -> None:
    p = sub.add_parser("search", help="search per-layer quantisation types with NSGA-II (persistent, resumable)",
                       description="Run NSGA-II over per-gene quantisation types in an Optuna study stored in the "
                                   "storage. Profiles first if needed. Running it again continues the study.")
    add_model_options(p)
    add_storage_option(p)
    p.add_argument("--study", default=None, help="study name (default: derived from model, granularity and types)")
    p.add_argument("--trials", type=int, default=None,
                   help="trials to add in this run, rounded up to whole generations (default 5000; measured 100)")
    p.add_argument("--population", type=int, default=None, help="NSGA-II population size (default 50)")
    p.add_argument("--evaluate", choices=["proxy", "measured"], default=None,
                   help="proxy: predicted loss from the profile (default); measured: real KL of each genome")
    p.add_argument("--max-mib", type=float, default=None, help="constraint: model size at most this many MiB")
    p.add_argument("--min-avg-bits", type=float, default=None, help="constraint: parameter-weighted average bits")
    p.add_argument("--crossover-prob", type=float, default=None, help="NSGA-II crossover probability (default 0.9)")
    p.add_argument("--mutation-prob", type=float, default=None,
                   help="per-gene mutation probability (default 1/number of genes)")
    p.add_argument("--seed", type=int, default=None, help="sampler seed (default 0)")
    p.add_argument("--seed-from", default=None, metavar="STUDY",
                   help="also seed the first generation with this study's front (e.g. a proxy study for --evaluate measured)")
    p.add_argument("--params", choices=["auto", "all", "front"], default=None,
                   help="which trials store one Optuna param per gene: all, or the front only (auto: all up "
                        "to 64 genes); every trial stores its genome in the 'genome' attribute")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(handler=run)

    f = sub.add_parser("front", help="show a study's Pareto front (per-gene types, memory, predicted loss)")
    f.add_argument("--study", required=True, help="study name (see `empas studies`)")
    f.add_argument("--exact", action="store_true", help="also show the exact front of the proxy and the ratio")
    add_storage_option(f)
    f.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    f.set_defaults(handler=run_front)

    s = sub.add_parser("studies", help="list the studies in the storage")
    add_storage_option(s)
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(handler=run_studies)

    d = sub.add_parser("dashboard", help="serve optuna-dashboard for the storage on 127.0.0.1")
    add_storage_option(d)
    d.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 (default 8080; 0 picks a free one)")
    d.set_defaults(handler=run_dashboard)


# -- search ------------------------------------------------------------------------------------

def _settings(args):
    from search.settings import SearchSettings

    settings = SearchSettings(study_name=args.study, population=args.population, trials=args.trials,
                              crossover_prob=args.crossover_prob, mutation_prob=args.mutation_prob, seed=args.seed,
                              evaluate=args.evaluate, max_mib=args.max_mib, min_avg_bits=args.min_avg_bits,
                              seed_from=args.seed_from, params=args.params)
    settings.validate()
    return settings


def run(args) -> int:
    from storage.database import open_database

    from ..jobs.search import run_search_job
    from .profile import progress_label

    settings = _settings(args)
    explicit = explicit_profile_options(args)
    profile = profile_settings(args)
    db = open_database(args.storage)  # unreachable or locked database: fail before loading a model
    stop = threading.Event()
    pbar = ProgressBar("profiling", enabled=not args.json, stream=sys.stderr)
    bar = ProgressBar("searching", enabled=not args.json, stream=sys.stderr)

    def progress(event) -> None:
        pbar.close()
        hv = f" HV {event.hypervolume_ratio:.4f}" if event.hypervolume_ratio is not None else ""
        bar.update(event.trials_done, event.trials_target, f"gen {event.generation} front {len(event.front)}{hv}")

    with signals.graceful(stop, "" if args.json else "stopping after the current generation"):
        try:
            job = run_search_job(profile, settings, db, explicit,
                                 profile_progress=lambda e: pbar.update(e.done, e.total, progress_label(e),
                                                                        e.eta_seconds),
                                 search_progress=progress, should_stop=stop.is_set)
        except Exception as exc:
            if not _profile_cancelled(exc):
                raise
            pbar.close()  # a signal while profiling: the finished genes are stored
            raise KeyboardInterrupt from None
    pbar.close()
    bar.close()
    if job.note:
        print(f"empas: {job.note}", file=sys.stderr)
    result = job.result
    if args.json:
        print_json(result.to_dict())
    else:
        print_result(result)
    if result.stopped:
        signals.say(f"empas: {signals.describe()}; finished generations are saved, run the same command "
                    f"again to resume")
        return signals.exit_code()
    return 0


def _profile_cancelled(exc: BaseException) -> bool:
    """``exc`` is the profiler's stop (looked up only if profiling ran: a resume by study name never
    imports the model side, torch included)."""
    sensitivity = sys.modules.get("profiling.sensitivity")
    return sensitivity is not None and isinstance(exc, sensitivity.ProfileCancelled)


def qtype_summary(qtypes: list[str]) -> str:
    """"q4_k:120 q6_k:30 f16:2" (most used first) for one genome."""
    counts: dict[str, int] = {}
    for q in qtypes:
        counts[q] = counts.get(q, 0) + 1
    return " ".join(f"{q}:{n}" for q, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _spread(points: list, limit: int) -> list:
    if len(points) <= limit:
        return points
    picks = sorted({round(i * (len(points) - 1) / (limit - 1)) for i in range(limit)})
    return [points[i] for i in picks]


def _point_rows(points, measured: bool, stream, limit: int = FRONT_TABLE_ROWS) -> None:
    w = stream.write
    head = f"{'trial':>7} {'memory MiB':>10} {'avg bits':>8} {'predicted loss':>14} {'predicted PPL':>13}"
    if measured:
        head += f" {'measured loss':>13}"
    w(head + "  genes per type\n")
    for p in _spread(points, limit):
        trial = "exact" if p.trial_number < 0 else str(p.trial_number)
        row = (f"{trial:>7} {p.memory_mib:10.2f} {p.average_bits:8.3f} {p.predicted_loss:14.4f} "
               f"{math.exp(min(p.predicted_loss, 700.0)):13.2f}")
        if measured:
            row += f" {p.measured['loss']:13.4f}" if p.measured else f" {'':>13}"
        w(row + f"  {qtype_summary(p.qtypes)}\n")
    if len(points) > limit:
        w(f"({limit} of {len(points)} points shown, evenly spread; --json lists all with per-gene types)\n")


def print_result(result, stream=None) -> None:
    stream = stream or sys.stdout
    w = stream.write
    state = "resumed" if result.resumed else "new"
    w(f"study {result.study_name} ({state}) in {result.storage}\n")
    w(f"{result.trials_run} trials in {result.seconds:.1f}s ({result.trials_per_s:.0f} trials/s), generations "
      f"{result.first_generation}..{result.last_generation}; the study has {result.trials_total} complete trials\n")
    hv = ("" if result.hypervolume_ratio is None else
          f"; hypervolume {result.hypervolume_ratio:.4f} of the exact proxy front ({result.exact_front_points} points)")
    w(f"Pareto front: {len(result.front)} points{hv}\n\n")
    _point_rows(result.front, result.evaluate == "measured", stream)
    w(f"\nper-gene types: `empas front --study {result.study_name} --json`\n")


# -- front / studies / dashboard -----------------------------------------------------------------

def run_front(args) -> int:
    from search.catalogue import exact_points, load_front
    from search.settings import SearchSettings
    from storage.database import open_database

    data = load_front(open_database(args.storage, create=False), args.study)
    exact = None
    if args.exact:
        exact = exact_points(data.space, SearchSettings(max_mib=data.settings.get("max_mib"),
                                                        min_avg_bits=data.settings.get("min_avg_bits")))
    names = list(data.profile.gene_names)
    if args.json:
        out = {"study": data.study_name, "model": data.profile.model_id, "granularity": data.profile.granularity,
               "qtypes": data.profile.qtypes, "genes": names, "memory_basis": data.profile.memory_basis, "evaluate": data.evaluate,
               "trials_complete": data.trials_complete, "settings": data.settings,
               "hypervolume_ratio": data.hypervolume_ratio, "base_loss": data.profile.base_loss,
               "points": [p.to_dict(names) for p in data.points]}
        if exact is not None:
            out["exact"] = [p.to_dict(names) for p in exact]
        print_json(out)
        return 0
    w = sys.stdout.write
    w(f"study {data.study_name}: {data.profile.model_id}, {data.profile.n_genes} {data.profile.granularity} genes, "
      f"types {','.join(data.profile.qtypes)}, {data.trials_complete} complete trials ({data.evaluate})\n")
    hv = "" if data.hypervolume_ratio is None else f"; hypervolume {data.hypervolume_ratio:.4f} of the exact proxy front"
    w(f"Pareto front: {len(data.points)} points{hv}\n\n")
    _point_rows(data.points, data.evaluate == "measured", sys.stdout)
    if exact is not None:
        w(f"\nexact front of the proxy (predicted): {len(exact)} points\n")
        _point_rows(exact, False, sys.stdout)
    return 0


def run_studies(args) -> int:
    from search.catalogue import list_studies
    from storage.database import open_database
    from storage.urls import redact, resolve_storage_url, sqlite_path

    url = resolve_storage_url(args.storage)
    path = sqlite_path(url)
    if path is not None and not path.is_file():  # nothing to list, and nothing to create
        rows = []
    else:
        rows = list_studies(open_database(url, create=False))
    if args.json:
        print_json(rows)
        return 0
    w = sys.stdout.write
    if not rows:
        w(f"no studies in {redact(url)}; start one with `empas search`\n")
        return 0
    w(f"{'study':44} {'model':30} {'genes':>11} {'trials':>7} {'front':>5} {'lightest MiB':>12} "
      f"{'best loss':>9}  last update\n")
    for r in rows:
        genes = f"{r['n_genes']} {r['granularity']}" if r["empas"] else "(not EMPAS)"
        best = r["best_points"]
        light = f"{best[0]['memory_mib']:.1f}" if best else "-"
        loss = f"{best[-1]['loss']:.4f}" if best else "-"
        model = (r["model"] or "-")[-30:]
        w(f"{r['name'][:44]:44} {model:30} {genes:>11} {r['trials_complete']:>7} {r['front_size']:>5} "
          f"{light:>12} {loss:>9}  {r['last_update'] or '-'}\n")
    w("(loss: the study's objective, predicted unless the study is measured)\n")
    return 0


def run_dashboard(args) -> int:
    from search.dashboard import start_dashboard
    from storage.urls import redact, resolve_storage_url

    url = resolve_storage_url(args.storage)
    server = start_dashboard(url, args.port, background=False, warm=True)
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        user = "user"
    print(f"optuna-dashboard for {redact(url)} at {server.url}")
    print(f"from another machine: ssh -L {server.port}:127.0.0.1:{server.port} {user}@{socket.gethostname()} "
          f"and open http://127.0.0.1:{server.port}/dashboard/")
    print("Ctrl-C stops it")
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server.server_close()
    return 0
