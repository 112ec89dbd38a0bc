"""Benchmark: one profile measured by one `empas profile` worker vs two sharing the storage, same run.

The workload is a per-block KL profile of the embedded SmolLM2-135M (by default RTN 4 bits vs 16 on
128 calibration tokens; the dense baseline is its dequantised Q4_1 weights). Each configuration is a
set of real `python -m empas_tui profile` processes started together on a fresh SQLite file; its wall
time runs from the first start to the last exit, model loading included: what a user waits for.

Fair on the cores: the single worker gets every core as torch threads (``--threads C``), each of
the two workers half of them (``--threads C/2``), so both configurations use the same CPUs. The
configurations alternate (1, 2, 1, 2, ...) so both see the same machine load. The two workers must
return the same profile, each cell measured once; the bar is two workers <= 0.65x one worker.

    flock /tmp/empas-bench.lock python bench/bench_workers.py [--repeats 2] [--calib-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from storage.atomic import atomic_write_text  # noqa: E402

BAR = 0.65


def worker_argv(args, storage: Path, threads: int) -> list[str]:
    return [sys.executable, "-m", "empas_tui", "profile", "--model", args.model, "--quantizer", "rtn",
            "--granularity", args.granularity, "--bits", args.bits, "--calib-tokens", str(args.calib_tokens),
            "--heldout-tokens", "128", "--seq-len", str(args.seq_len), "--threads", str(threads),
            "--storage", str(storage), "--json"]


def run_workers(args, workers: int, threads: int, folder: Path) -> dict:
    """Start ``workers`` processes on a fresh storage; wall time to the last exit and their outputs."""
    storage = folder / f"w{workers}-{time.monotonic_ns()}.db"
    env = {"EMPAS_CACHE_DIR": str(ROOT / ".cache" / "empas"),  # converted weights, shared with the tests
           **os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    procs = [subprocess.Popen(worker_argv(args, storage, threads), cwd=folder, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(workers)]
    outs = [p.communicate() for p in procs]
    wall = time.perf_counter() - started
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise SystemExit(f"a worker failed ({p.returncode}): {err.strip()[-400:]}")
    runs = [json.loads(out) for out, _ in outs]
    cells = sum(len(v) for v in runs[0]["S"].values())
    here = [cells - r["reused_entries"] - r["remote_entries"] for r in runs]
    assert all(r["S"] == runs[0]["S"] for r in runs), "workers returned different profiles"
    assert sum(here) == cells, f"cells measured {here} do not add up to {cells}: some were measured twice"
    return {"wall_seconds": wall, "profiling_seconds": [r["seconds"] for r in runs], "cells_measured": here,
            "cells": cells, "S": runs[0]["S"]}


def max_relative_difference(a: dict, b: dict) -> float:
    out = 0.0
    for gene, values in a.items():
        for q, v in values.items():
            out = max(out, abs(v - b[gene][q]) / max(abs(v), 1e-12))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--granularity", default="block")
    ap.add_argument("--bits", default="4,16")
    ap.add_argument("--calib-tokens", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2, help="cores the configurations share")
    ap.add_argument("--single-threads", type=int, default=0,
                    help="torch threads of the single worker (default: every core, the same CPUs as the two "
                         "workers; 1 isolates the split from torch's threading)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "workers.json"))
    args = ap.parse_args()
    half = max(args.cores // 2, 1)
    single = args.single_threads or args.cores
    rows = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="empas-bench-workers-") as tmp:
        folder = Path(tmp)
        for r in range(args.repeats):
            one = run_workers(args, 1, single, folder)
            two = run_workers(args, 2, half, folder)
            row = {"repeat": r, "one_worker_seconds": one["wall_seconds"], "two_workers_seconds": two["wall_seconds"],
                   "ratio": two["wall_seconds"] / one["wall_seconds"],
                   "one_worker_profiling_seconds": one["profiling_seconds"][0],
                   "two_workers_profiling_seconds": two["profiling_seconds"],
                   "two_workers_cells_measured": two["cells_measured"], "cells": one["cells"],
                   "max_relative_difference_of_S": max_relative_difference(one["S"], two["S"])}
            rows.append(row)
            print(f"repeat {r}: 1 worker {row['one_worker_seconds']:6.1f}s   "
                  f"2 workers {row['two_workers_seconds']:6.1f}s   ratio {row['ratio']:.3f}   "
                  f"cells per worker {two['cells_measured']}", file=sys.stderr)
    ratio = statistics.median(r["ratio"] for r in rows)
    result = {
        "workload": {"model": args.model, "granularity": args.granularity, "quantizer": "rtn", "bits": args.bits,
                     "calibration_tokens": args.calib_tokens, "seq_len": args.seq_len, "metric": "kl",
                     "storage": "sqlite (fresh file per configuration)",
                     "note": "default model: the dense baseline is SmolLM2's dequantised Q4_1 weights"},
        "fairness": f"1 worker x {single} torch threads vs 2 workers x {half}; wall time from the first start "
                    f"to the last exit, model loading included; configurations interleaved",
        "rows": rows, "median_ratio": ratio, "bar": BAR, "meets_bar": ratio <= BAR,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "hardware": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
    }
    print(f"\n{'repeat':>6} {'1 worker s':>11} {'2 workers s':>12} {'ratio':>7}")
    for r in rows:
        print(f"{r['repeat']:>6} {r['one_worker_seconds']:>11.1f} {r['two_workers_seconds']:>12.1f} {r['ratio']:>7.3f}")
    print(f"median ratio {ratio:.3f} (bar <= {BAR}): {'met' if ratio <= BAR else 'NOT met'}")
    atomic_write_text(Path(args.out), json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
