"""Benchmark: what a redraw of the busiest TUI screens costs, against the 0.25 s redraw interval.

The screens redraw on a timer (4 Hz) instead of once per progress event, so what matters is the cost of
one redraw at the largest sizes EMPAS produces: the profile table of a 210-gene (per-linear) SmolLM2
profile, and the search screen with a large front, earlier-front points and the exact front. Also
measured: how many progress messages per second a screen absorbs (the worker posts one per event).
Synthetic data with SmolLM2's shapes (``search.synthetic``); headless app, no model.

    python bench/bench_tui.py [--repeats 10] [--out bench/results/tui.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from types import SimpleNamespace  # noqa: E402

from profiling.sensitivity import ProfileEvent  # noqa: E402
from profiling.settings import ProfileSettings, QuantizerSettings  # noqa: E402
from search.exact_front import front_for_space  # noqa: E402
from search.results import FrontPoint, SearchEvent  # noqa: E402
from search.space import SearchSpace  # noqa: E402
from search.synthetic import synthetic_profile  # noqa: E402
from storage.atomic import atomic_write_text  # noqa: E402

from empas_tui.tui.app import EmpasApp  # noqa: E402
from empas_tui.tui.config import RunConfig  # noqa: E402
from empas_tui.tui.messages import ProfilePlanned, ProfileProgress, SearchProgress  # noqa: E402
from empas_tui.tui.screens.profile import ProfileScreen  # noqa: E402
from empas_tui.tui.screens.search import SearchScreen  # noqa: E402

BITS = ("2", "3", "4", "8", "16")


def front_points(profile, count: int) -> list[FrontPoint]:
    space = SearchSpace.from_profile(profile)
    front = front_for_space(space)
    pick = np.unique(np.linspace(0, len(front) - 1, min(count, len(front))).round().astype(int))
    return [FrontPoint(trial_number=int(k), qtypes=space.qtypes_of(front.genomes[i]), predicted_loss=float(front.loss[i]),
                       memory_bytes=int(front.memory[i]), average_bits=float(space.average_bits(front.genomes[i])))
            for k, i in enumerate(pick)]


async def timed_redraws(pilot, screen, mark, repeats: int) -> list[float]:
    """CPU seconds of one redraw and the layout/paint it causes (process time: robust on a shared
    machine, and it leaves out the app's idle waits between frames)."""
    out = []
    for _ in range(repeats):
        mark()
        t0 = time.process_time()
        screen._redraw()
        await pilot.pause()  # let the app lay out and paint what changed
        out.append(time.process_time() - t0)
    return out


async def bench_size(size, profile, points, repeats: int, db: str) -> dict:
    result = {"size": f"{size[0]}x{size[1]}"}
    app = EmpasApp(storage=db, loader=lambda spec: None)
    async with app.run_test(size=size) as pilot:
        # profile screen: 210 genes x 4 widths, every value known
        cfg = RunConfig(profile=ProfileSettings(granularity="linear",
                                                quantizer=QuantizerSettings.parse("rtn", ",".join(BITS))))
        screen = ProfileScreen(cfg, autostart=False)
        await app.push_screen(screen)
        known = {(i, q): float(profile.sensitivity[i, j]) for i in range(profile.n_genes)
                 for j, q in enumerate(profile.qtypes)}
        plan = SimpleNamespace(gene_names=profile.gene_names, gene_params=profile.gene_params,
                               qtypes=list(profile.qtypes), unquantized=profile.unquantized, valid=profile.valid,
                               known=known, total=len(known), note="")
        screen.on_profile_planned(ProfilePlanned(plan))
        screen.sort_index = 3

        def resort():  # worst case: the row order changes, the table is rebuilt
            screen.sort_reverse = not screen.sort_reverse
            screen._rows_dirty = screen._dirty = True

        times = await timed_redraws(pilot, screen, resort, repeats)
        result["profile_rebuild_ms"] = 1000 * statistics.median(times)
        rng = np.random.default_rng(1)

        def one_gene():  # the usual case while profiling: one more layer measured
            i = int(rng.integers(profile.n_genes))
            for q in profile.qtypes:
                screen.values[(i, q)] = screen.values[(i, q)] * 1.0001
            screen._changed.add(i)
            screen.sort_index = 0
            screen._rows_dirty = screen._dirty = True

        times = await timed_redraws(pilot, screen, one_gene, repeats)
        result["profile_one_gene_ms"] = 1000 * statistics.median(times)
        # message absorption: progress events posted as fast as possible
        n = 5000
        t0 = time.perf_counter()
        for k in range(n):
            screen.post_message(ProfileProgress(ProfileEvent("entry", k, n, k % profile.n_genes,
                                                             profile.gene_names[k % profile.n_genes], "2", 0.1, 1.0)))
        await pilot.pause()
        while screen.done != n - 1:
            await pilot.pause(0.01)
        result["profile_events_per_s"] = n / (time.perf_counter() - t0)
        app.pop_screen()
        await pilot.pause()

        # search screen: a front of len(points), 1,000 earlier-front points, the exact front
        search = SearchScreen("bench")
        search.profile = profile  # drawn as given: nothing is loaded or searched
        await app.push_screen(search)
        await pilot.pause()
        rng = np.random.default_rng(0)
        for p in rng.choice(points, size=min(1000, len(points)), replace=False):
            search.history[(p.memory_bytes + int(rng.integers(1, 1 << 20)), p.predicted_loss * 1.01)] = None
        event = SearchEvent("generation", "bench", 10, 500, 5000, 5000, 5.0, 100.0, points, 0.99)
        search.on_search_progress(SearchProgress(event))
        while not len(search.exact_xy):
            await pilot.pause(0.05)
        search.selected_trial = points[len(points) // 2].trial_number

        def new_front():  # a generation changed the front: table, plot and layers redrawn
            search._front_shown = []
            search._layers_for = None
            search._table_dirty = search._dirty = True

        times = await timed_redraws(pilot, search, new_front, repeats)
        result["search_new_front_ms"] = 1000 * statistics.median(times)
        picks = iter(rng.choice(points, size=repeats))

        def select():  # the user moves the selection: plot marker, strip and layer table
            search.selected_trial = next(picks).trial_number
            search._dirty = True

        times = await timed_redraws(pilot, search, select, repeats)
        result["search_select_ms"] = 1000 * statistics.median(times)
        result["front_points"] = len(points)
        result["history_points"] = len(search.history)
        result["exact_front_points"] = search.exact_count
    return result


async def main_async(args) -> list[dict]:
    profile = synthetic_profile(granularity="linear", bits=tuple(int(b) for b in BITS))
    points = front_points(profile, args.front_points)
    rows = []
    for size in ((80, 24), (200, 50)):
        rows.append(await bench_size(size, profile, points, args.repeats, args.db))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--front-points", type=int, default=300)
    ap.add_argument("--db", default="/tmp/empas-bench-tui.db")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "tui.json"))
    args = ap.parse_args()
    rows = asyncio.run(main_async(args))
    head = ("size", "profile rebuild ms", "profile +1 layer ms", "events/s", "search new front ms",
            "search select ms")
    print("  ".join(f"{h:>{max(8, len(h))}}" for h in head))
    for r in rows:
        vals = (r["size"], f"{r['profile_rebuild_ms']:.1f}", f"{r['profile_one_gene_ms']:.1f}",
                f"{r['profile_events_per_s']:.0f}", f"{r['search_new_front_ms']:.1f}", f"{r['search_select_ms']:.1f}")
        print("  ".join(f"{v:>{max(8, len(h))}}" for v, h in zip(vals, head)))
    print(f"(front {rows[0]['front_points']} points, {rows[0]['history_points']} earlier-front points, exact front "
          f"{rows[0]['exact_front_points']} points; 210 genes x 5 widths)")
    out = {"benchmark": "tui redraw", "genes": 210, "qtypes": list(BITS), "redraw_interval_ms": 250,
           "rows": rows, "python": platform.python_version(), "machine": platform.machine(),
           "note": "median CPU ms of --repeats redraws (redraw + one app pause), headless, synthetic "
                   "SmolLM2-shaped data"}
    atomic_write_text(args.out, json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
