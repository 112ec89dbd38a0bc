"""Benchmark: the fast KL profile against the exact one, side by side, on a subset of SmolLM2's genes.

Per-linear KL profile of the embedded SmolLM2-135M, ggml's default types, 512 calibration tokens.
For every gene of the subset (all 7 linears of each ``--blocks`` block), the exact path (every
cell on every token, today's code) and the fast path (exact shortcuts, screening, exact measurement of
the rest) are run *interleaved*, in the same process, so both see the same machine load; wall and CPU
time are summed per path. Then, on the subset:

- every cell the fast path measured: relative error against the exact value (bar: <= 5%, or <= 1e-5
  nats absolute);
- every cell it skipped as dominated: whether, in exact values, a cheaper-or-equal type of the same
  gene really is as good (a violation when none is);
- the archetypes (search's selection on the exact front of each profile): identical choices?

    flock /tmp/empas-bench.lock python bench/bench_profile_fast.py [--blocks 8,24] [--full]

``--full`` also times the fast path on the whole per-linear profile (every gene, the embedding too).
Writes bench/results/profile_fast.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from profiling.inventory import Inventory  # noqa: E402
from profiling.profile import skip_reason  # noqa: E402
from profiling.runner import PrefixRunner  # noqa: E402
from profiling.sensitivity import make_screening, measure_gene, prepare, run_profile  # noqa: E402
from profiling.settings import SCREEN_MARGIN, SCREEN_TOKENS, ProfileSettings, QuantizerSettings  # noqa: E402
from storage.atomic import atomic_write_text  # noqa: E402
from storage.database import open_database  # noqa: E402

REL_BAR, ABS_BAR = 0.05, 1e-5


def subset_setup(setup, gene_indices):
    inv = setup.inventory
    sub = Inventory(inv.granularity, inv.blocks_path, [inv.genes[i] for i in gene_indices], inv.total_params)
    return replace(setup, inventory=sub)


def archetype_genomes(profile) -> dict[str, list[str]]:
    from search.archetypes import select_archetypes
    from search.exact_front import front_for_space
    from search.space import SearchSpace

    space = SearchSpace.from_profile(profile)
    front = front_for_space(space)  # fixed bytes and base loss included
    return {c.archetype: space.qtypes_of(front.genomes[c.index])
            for c in select_archetypes(front.memory, front.loss, space.base_loss)}


def _commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", default="8,24", help="blocks whose 7 linears form the subset (default 8,24)")
    ap.add_argument("--calib-tokens", type=int, default=512)
    ap.add_argument("--full", action="store_true", help="also time the fast path on the full per-linear profile")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "profile_fast.json"))
    args = ap.parse_args()

    commit = _commit()  # the code this run imported, before anything else can be committed
    t0 = time.perf_counter()
    settings = ProfileSettings(granularity="linear", quantizer=QuantizerSettings.parse("ggml"),
                               calib_tokens=args.calib_tokens)
    setup = prepare(settings)
    load_s = time.perf_counter() - t0
    inv, quantizer = setup.inventory, setup.quantizer
    qtypes = list(quantizer.qtypes)
    blocks = [int(b) for b in args.blocks.split(",")]
    genes = [i for i, g in enumerate(inv.genes) if g.block in blocks]
    runner = PrefixRunner(setup.loaded.model, inv, setup.tokens.calibration, importance=setup.importance)
    screen = make_screening(setup, runner)
    valid = inv.valid_table(quantizer, qtypes)

    exact_values, fast_values, per_gene = {}, {}, []
    totals = {"exact_wall": 0.0, "exact_cpu": 0.0, "fast_wall": 0.0, "fast_cpu": 0.0}
    for n, i in enumerate(genes):
        cells = [q for j, q in enumerate(qtypes) if valid[i, j]]
        row = {"gene": inv.genes[i].name, "block": inv.genes[i].block, "cells": len(cells)}
        for path, scr, out in (("exact", None, exact_values), ("fast", screen, fast_values)):
            w, c = time.perf_counter(), time.process_time()
            values = measure_gene(runner, inv, quantizer, i, cells, {}, scr)
            w, c = time.perf_counter() - w, time.process_time() - c
            totals[f"{path}_wall"] += w
            totals[f"{path}_cpu"] += c
            row[f"{path}_s"] = round(w, 2)
            out.update({(i, q): v for q, v in values.items()})
        row["fast_exact_measured"] = sum(1 for q in cells if (i, q) in fast_values and not skip_reason(fast_values[(i, q)])
                                         and q != quantizer.unquantized)
        per_gene.append(row)
        print(f"\rgene {n + 1}/{len(genes)} {row['gene']:28} exact {totals['exact_wall']:7.1f}s  "
              f"fast {totals['fast_wall']:7.1f}s", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    # fidelity of the measured cells, soundness of the skipped ones
    worst_rel, worst_abs, over_bar, checked = 0.0, 0.0, [], 0
    violations, dominated = [], 0
    reasons: dict[str, int] = {}
    for i in genes:
        cost = {q: sum(quantizer.weight_bytes(q, w.out_features, w.in_features) for w in inv.genes[i].weights)
                for j, q in enumerate(qtypes) if valid[i, j]}
        for q in cost:
            exact, fast = exact_values[(i, q)], fast_values[(i, q)]
            reason = skip_reason(fast)
            if reason:
                dominated += 1
                reasons[reason] = reasons.get(reason, 0) + 1
                if not any(exact_values[(i, p)] <= exact for p in cost if p != q and cost[p] <= cost[q]):
                    violations.append({"gene": inv.genes[i].name, "qtype": q, "exact": exact, "reason": reason})
                continue
            checked += 1
            err = abs(fast - exact)
            rel = err / exact if exact > 0 else (0.0 if err == 0 else float("inf"))
            worst_abs = max(worst_abs, err)
            if err > ABS_BAR:
                worst_rel = max(worst_rel, rel)
            if rel > REL_BAR and err > ABS_BAR:
                over_bar.append({"gene": inv.genes[i].name, "qtype": q, "exact": exact, "fast": fast})

    # archetypes on the subset, from the two profiles as run_profile builds them (through SQLite)
    sub_exact = subset_setup(replace(setup, settings=replace(settings, mode="exact")), genes)
    sub_fast = subset_setup(setup, genes)
    profiles = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, sub, values in (("exact", sub_exact, exact_values), ("fast", sub_fast, fast_values)):
            store = open_database(f"sqlite:///{Path(tmp) / (name + '.db')}").profiles
            store.ensure_header(sub.key, {"model_id": setup.loaded.model_id,
                                          "model_fingerprint": setup.loaded.fingerprint,
                                          "corpus_fingerprint": setup.tokens.fingerprint,
                                          "granularity": inv.granularity, "metric": "kl",
                                          "base_loss": runner.base_loss})
            store.add_entries(sub.key, {(k, q): values[(i, q)] for k, i in enumerate(genes)
                                        for q in qtypes if (i, q) in values})
            profiles[name] = run_profile(sub, store)
    arch = {name: archetype_genomes(p) for name, p in profiles.items()}

    result = {
        "model": setup.loaded.model_id, "note": "dense = the dequantised Q4_1 GGUF: Q4_1 is lossless on it, which "
                                                "flatters the zero shortcut",
        "granularity": "linear", "qtypes": qtypes, "calibration_tokens": setup.tokens.calibration_tokens,
        "screen_tokens": SCREEN_TOKENS, "screen_margin": SCREEN_MARGIN, "blocks": blocks, "genes": len(genes),
        "cells": int(sum(valid[i].sum() for i in genes)), "load_seconds": round(load_s, 1),
        **{k: round(v, 2) for k, v in totals.items()},
        "speedup_wall": totals["exact_wall"] / totals["fast_wall"],
        "speedup_cpu": totals["exact_cpu"] / totals["fast_cpu"],
        "measured_cells_checked": checked, "worst_relative_error_above_abs_bar": worst_rel,
        "worst_absolute_error": worst_abs, "cells_over_bar": over_bar,
        "dominated_cells": dominated, "dominated_by_reason": reasons, "dominance_violations": violations,
        "archetypes_exact": arch["exact"], "archetypes_fast": arch["fast"],
        "archetypes_identical": arch["exact"] == arch["fast"], "per_gene": per_gene,
        "hardware": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads "
                    f"(2-core machine shared with other jobs)",
        "torch": torch.__version__, "commit": commit,
    }
    if args.full:
        t = time.perf_counter()
        full = run_profile(setup, None, runner=runner)
        result["full_fast_profile_seconds"] = round(time.perf_counter() - t, 1)
        result["full_fast_profile_skipped"] = dict(full.skipped)
        result["full_fast_profile_cells"] = int(full.valid.sum())
    atomic_write_text(args.out, json.dumps(result, indent=2))

    print(f"\nSmolLM2 per-linear KL profile, ggml default types, {result['calibration_tokens']} calibration tokens; "
          f"subset: all linears of blocks {blocks} ({len(genes)} genes, {result['cells']} cells); {result['hardware']}")
    rows = [
        ("exact path, wall / CPU (s)", f"{totals['exact_wall']:.1f} / {totals['exact_cpu']:.1f}"),
        ("fast path, wall / CPU (s)", f"{totals['fast_wall']:.1f} / {totals['fast_cpu']:.1f}"),
        ("speed-up, wall / CPU", f"{result['speedup_wall']:.2f}x / {result['speedup_cpu']:.2f}x"),
        ("cells measured by the fast path, checked", f"{checked}"),
        ("worst relative error (cells above 1e-5 abs)", f"{worst_rel:.2e}"),
        ("worst absolute error (nats)", f"{worst_abs:.2e}"),
        ("cells over the bar (5% and 1e-5)", f"{len(over_bar)}"),
        ("cells skipped as dominated", f"{dominated} {reasons}"),
        ("dominance violations", f"{len(violations)}"),
        ("archetype choices identical", f"{result['archetypes_identical']}"),
    ]
    if args.full:
        rows.append(("full per-linear fast profile (s)", f"{result['full_fast_profile_seconds']:.1f}"))
    for name, value in rows:
        print(f"{name:46} {value:>24}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
