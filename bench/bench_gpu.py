"""The GPU check: profile + measured search + evaluation of SmolLM2 on CUDA (bf16) and on the CPU.

Each placement runs the same work: a KL profile (rtn 2,4,8,16; ``--granularity``, ``--calib-tokens``),
a short NSGA-II search in *measured* mode (every trial's KL measured on the model, so the search runs
on the device too), and a held-out evaluation of the uniform 4- and 8-bit genomes. It reports the
Spearman correlation of S between the two placements (target >= 0.99), the held-out numbers of both,
and the speed-up of each phase (CPU seconds / GPU seconds, same run). Everything to JSON.

    python bench/bench_gpu.py                       # on the device machine (~8 min limit on an H200)
    python bench/bench_gpu.py --cpu-only --quick    # the CPU half on a small subset (no GPU needed)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_placement(device: str, dtype: str, args) -> dict:
    import numpy as np
    import torch

    from empas_tui.jobs.search import calibration_kl
    from profiling.baselines import uniform_genome
    from profiling.evaluation import prepare_validation
    from profiling.sensitivity import prepare, run_profile
    from profiling.settings import ProfileSettings, QuantizerSettings
    from search.nsga import run_search
    from search.settings import SearchSettings
    from storage.database import open_database

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    out: dict = {"device": device, "dtype": dtype}
    t = time.perf_counter()
    settings = ProfileSettings(model=args.model, granularity=args.granularity,
                               quantizer=QuantizerSettings.parse("rtn", args.bits, 64),
                               calib_tokens=args.calib_tokens, heldout_tokens=args.heldout_tokens,
                               seq_len=args.seq_len, device=device, dtype=dtype)
    setup = prepare(settings)
    out["load_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    profile = run_profile(setup)
    sync()
    out["profile_s"] = round(time.perf_counter() - t, 2)
    out["compute_dtype"] = setup.compute_dtype
    out["cells"] = int(np.isfinite(profile.sensitivity).sum())
    out["S"] = profile.sensitivity.tolist()
    out["base_loss"] = profile.base_loss

    with tempfile.TemporaryDirectory() as tmp:
        db = open_database(f"sqlite:///{Path(tmp) / 'gpu-check.db'}")
        t = time.perf_counter()
        result = run_search(SearchSettings(study_name=f"gpu-check-{device}", population=args.population,
                                           trials=args.trials, evaluate="measured"), profile, db,
                            measure=calibration_kl(setup))
        sync()
        out["search_s"] = round(time.perf_counter() - t, 2)
        out["search_trials"] = result.trials_run
        out["front_points"] = len(result.front)

    t = time.perf_counter()
    validation = prepare_validation(setup.loaded, setup.quantizer, args.heldout_tokens, args.seq_len)
    inv = validation.inventory("linear")
    rows = validation.run([uniform_genome(inv, 4), uniform_genome(inv, 8)]).rows
    sync()
    out["evaluate_s"] = round(time.perf_counter() - t, 2)
    out["heldout"] = {r.name: {"ppl": r.ppl, "kl": r.kl} for r in rows}
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(0)
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    del setup, validation
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--granularity", default="block", choices=["block", "linear"])
    ap.add_argument("--bits", default="2,4,8,16")
    ap.add_argument("--calib-tokens", type=int, default=512)
    ap.add_argument("--heldout-tokens", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--population", type=int, default=8)
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--gpu-dtype", default="bfloat16")
    ap.add_argument("--cpu-only", action="store_true", help="run the CPU half only (no GPU needed)")
    ap.add_argument("--quick", action="store_true", help="a small subset: 64 tokens, bits 4,16, 4 trials")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.quick:
        args.calib_tokens, args.heldout_tokens, args.bits, args.population, args.trials = 64, 64, "4,16", 4, 4
        args.seq_len = 32
    out_path = Path(args.out or ROOT / "bench" / "results" / ("gpu_cpu_only.json" if args.cpu_only else "gpu.json"))

    import torch

    from profiling.sensitivity import correlations

    placements = [("cpu", "float32")]
    if not args.cpu_only:
        if not torch.cuda.is_available():
            raise SystemExit("bench_gpu: no CUDA GPU here: pass --cpu-only for the CPU half")
        placements.insert(0, ("cuda:0", args.gpu_dtype))
    runs = []
    for device, dtype in placements:
        print(f"== {device} {dtype}", flush=True)
        r = run_placement(device, dtype, args)
        print(f"   load {r['load_s']} s, profile {r['profile_s']} s ({r['cells']} cells), search {r['search_s']} s "
              f"({r['search_trials']} measured trials), evaluate {r['evaluate_s']} s; held-out "
              + ", ".join(f"{k} PPL {v['ppl']:.3f}" for k, v in r["heldout"].items()), flush=True)
        runs.append(r)

    result = {"model": args.model, "granularity": args.granularity, "bits": args.bits,
              "calib_tokens": args.calib_tokens, "heldout_tokens": args.heldout_tokens,
              "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}",
              "runs": [{k: v for k, v in r.items() if k != "S"} for r in runs]}
    if len(runs) == 2:
        import numpy as np

        gpu, cpu = (np.array(r["S"], dtype=float) for r in runs)
        unq = [j for j, q in enumerate(args.bits.split(",")) if q != "16"]
        mask = np.isfinite(gpu[:, unq]) & np.isfinite(cpu[:, unq])
        rho = correlations(list(gpu[:, unq][mask]), list(cpu[:, unq][mask]))
        result["spearman_S_gpu_vs_cpu"] = rho["spearman"]  # over every quantised cell (the target)
        qtypes = args.bits.split(",")
        result["spearman_per_qtype"] = {
            qtypes[j]: correlations(list(gpu[:, j][np.isfinite(gpu[:, j])]), list(cpu[:, j][np.isfinite(cpu[:, j])]))[
                "spearman"] for j in unq}  # within one type: bf16's rounding floor shows at 8 bits
        result["pearson_S_gpu_vs_cpu"] = rho["pearson"]
        result["spearman_ok"] = bool(rho["spearman"] >= 0.99)
        result["speedup_cpu_over_gpu"] = {phase: round(runs[1][f"{phase}_s"] / max(runs[0][f"{phase}_s"], 1e-9), 2)
                                          for phase in ("profile", "search", "evaluate")}
        print(f"Spearman(S gpu, S cpu) = {rho['spearman']:.4f} (target >= 0.99); speed-up "
              + ", ".join(f"{k} {v}x" for k, v in result["speedup_cpu_over_gpu"].items()))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    from storage.atomic import atomic_write_text

    atomic_write_text(out_path, json.dumps(result, indent=1))
    print(f"wrote {out_path}")
    if len(runs) == 2 and not result["spearman_ok"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
