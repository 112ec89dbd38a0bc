"""Benchmark (the GGUF issue's bar): EMPAS's GGUF files against llama.cpp's presets at equal file size.

SmolLM2-135M (the embedded model; its "dense" weights are a lossless dequantisation of a Q4_1 GGUF, so
Q4_1 re-quantises them exactly, and its hidden size 576 is not a multiple of 256, so the K-quants fit
only ffn_down). One run:

1. An F16 GGUF of the dense model (EMPAS's writer; metadata and tokenizer from the model's own GGUF),
   and llama.cpp's presets Q4_K_M, Q3_K_M, Q2_K made from it by ``llama_model_quantize`` (what
   ``llama-quantize`` does), no importance matrix (llama-quantize's default).
2. EMPAS the way a user runs it, through the job layer: a per-linear KL profile with the ggml
   quantiser (default types, embeddings as genes, importance collected on the 512 calibration tokens),
   an NSGA-II search, then for each preset ``empas export --max-mib <preset file size>`` (max-accuracy
   under that size, refined by measuring the front points near it on the calibration tokens), GGUF.
3. Every file measured by llama.cpp: held-out PPL and mean KL to the F16 file from llama.cpp's logits,
   on the default corpus's held-out text (other standard-library modules than the calibration text;
   nothing was tuned on it), and greedy generation tokens/s (1 thread, median of ``--repeats``).
4. The same with the Q4_1 type excluded (``--types`` without q4_1), so the gain that does not come from
   this model's Q4_1 grid is visible.

Bar: at each preset's size, the EMPAS file is no larger, its mean KL at most 0.6x the preset's, and it
generates at the preset's speed (+-10%). Table printed, JSON written to ``--out``.

    python bench/bench_gguf_bar.py [--db PATH] [--trials 5000] [--heldout-tokens 2048] [--out bench/results/gguf_bar.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from empas_tui.jobs.export import export_job  # noqa: E402
from empas_tui.jobs.search import run_search_job  # noqa: E402
from profiling.corpus import build_token_sets  # noqa: E402
from profiling.deploy.gguf_writer import gguf_layout_for, write_gguf  # noqa: E402
from profiling.deploy.llamacpp import (evaluate_gguf, generate, hardware_description, quantize_with_llamacpp,  # noqa: E402
                                       reference_for, timed_load)
from profiling.models import cache_dir, load_model  # noqa: E402
from profiling.quantizers.ggml_types import DEFAULT_TYPES  # noqa: E402
from profiling.settings import ProfileSettings, QuantizerSettings  # noqa: E402
from search.export_settings import ExportSettings  # noqa: E402
from search.settings import SearchSettings  # noqa: E402
from storage.atomic import atomic_write_text  # noqa: E402
from storage.database import open_database  # noqa: E402

PRESETS = ("Q4_K_M", "Q3_K_M", "Q2_K")
MIB = 1024 * 1024
PROMPT = "The history of the printing press begins"
KL_BAR, SPEED_TOLERANCE = 0.6, 0.10


def speed(path: Path, gen_tokens: int, repeats: int) -> dict:
    llm, load_s = timed_load(path, n_threads=1)
    runs = [generate(llm, PROMPT, gen_tokens, stop_at_eos=False) for _ in range(repeats)]
    del llm
    rates = [r.generation_tokens_per_s for r in runs]
    return {"load_seconds": load_s, "tokens_per_s": statistics.median(rates), "tokens_per_s_runs": rates}


def measure(path: Path, tokens, reference, gen_tokens: int, repeats: int) -> dict:
    ev = evaluate_gguf(path, tokens, reference, n_threads=1)
    return {"file": str(path), "bytes": path.stat().st_size, "ppl": ev.ppl, "kl": ev.kl,
            **speed(path, gen_tokens, repeats)}


def empas_files(loaded, db, types: tuple[str, ...], label: str, budgets: dict[str, int], out: Path,
                trials: int, calib_tokens: int, granularity: str = "linear") -> tuple[dict[str, Path], dict]:
    """Profile, search and export one GGUF per budget, the way `empas search` + `empas export` do."""
    settings = ProfileSettings(model="default", granularity=granularity, calib_tokens=calib_tokens,
                               quantizer=QuantizerSettings.parse("ggml", ",".join(types)), include_embeddings=True)
    t0 = time.perf_counter()
    job = run_search_job(settings, SearchSettings(study_name=f"bar-{label}", trials=trials), db, loaded=loaded,
                         profile_progress=lambda e: None)
    seconds = {"profile_and_search": time.perf_counter() - t0,
               "profile_measured_seconds": job.profile_job.profile.measured_seconds if job.profile_job else None}
    files = {}
    for preset, size in budgets.items():
        t0 = time.perf_counter()
        folder = out / f"{label}-{preset}"
        res = export_job(ExportSettings(study=job.result.study_name, output=str(folder), archetype="max-accuracy",
                                        max_mib=size / MIB, format="gguf"), db, loaded=loaded)
        files[preset] = folder / "max-accuracy.gguf"
        seconds[f"export_{preset}"] = time.perf_counter() - t0
        seconds[f"basis_{preset}"] = res.choices[0].basis
    return files, seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--db", default=str(cache_dir() / "bench" / "gguf_bar.db"),
                    help="storage for the profiles and studies (kept: a rerun reuses the profiles)")
    ap.add_argument("--work", default=str(cache_dir() / "bench" / "gguf_bar"), help="folder for the GGUF files")
    ap.add_argument("--trials", type=int, default=5000)
    ap.add_argument("--heldout-tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for profiling")
    ap.add_argument("--calib-tokens", type=int, default=512, help="calibration tokens of the all-types profile")
    ap.add_argument("--no-q4_1-calib-tokens", type=int, default=512,
                    help="calibration tokens of the no-q4_1 profile (less: a shorter run; stored in the JSON)")
    ap.add_argument("--no-q4_1-granularity", choices=("linear", "block"), default="linear",
                    help="genes of the no-q4_1 run (block: a shorter run, fewer choices; stored in the JSON)")
    ap.add_argument("--out", default="bench/results/gguf_bar.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    Path(args.db).parent.mkdir(parents=True, exist_ok=True)
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    result = {"hardware": hardware_description(), "load_average_start": [round(x, 2) for x in os.getloadavg()],
              "model": "default (SmolLM2-135M-Instruct; dense = dequantised Q4_1 GGUF; K-quants fit ffn_down only)",
              "heldout_tokens": args.heldout_tokens, "seq_len": args.seq_len, "code_commit": commit}

    loaded = load_model("default")
    f16 = work / "f16.gguf"
    if not f16.is_file():
        layout = gguf_layout_for(loaded.model, loaded.tokenizer, loaded.gguf_path)
        write_gguf(f16, loaded.model, layout, {})
    heldout = build_token_sets(loaded.tokenizer, args.seq_len, args.heldout_tokens, args.seq_len).heldout
    reference = reference_for(f16, heldout, n_threads=1)
    presets = {}
    for preset in PRESETS:
        path = work / f"{preset}.gguf"
        if not path.is_file():
            quantize_with_llamacpp(f16, path, preset)
        presets[preset] = measure(path, heldout, reference, args.gen_tokens, args.repeats)
    budgets = {p: presets[p]["bytes"] for p in PRESETS}

    runs = {}
    for label, types, calib, genes in (
            ("all-types", tuple(t.lower() for t in DEFAULT_TYPES), args.calib_tokens, "linear"),
            ("no-q4_1", tuple(t.lower() for t in DEFAULT_TYPES if t != "Q4_1"), args.no_q4_1_calib_tokens,
             args.no_q4_1_granularity)):
        # one storage per type set: each profile is measured (and timed) on its own, reusing nothing
        db = open_database(str(Path(args.db).with_suffix(f".{label}.db")))
        files, seconds = empas_files(loaded, db, types, label, budgets, work, args.trials, calib, genes)
        rows = {}
        for preset, path in files.items():
            row = measure(path, heldout, reference, args.gen_tokens, args.repeats)
            base = presets[preset]
            row.update(size_ok=row["bytes"] <= base["bytes"], kl_ratio=row["kl"] / base["kl"],
                       speed_ratio=row["tokens_per_s"] / base["tokens_per_s"])
            row["bar_met"] = bool(row["size_ok"] and row["kl_ratio"] <= KL_BAR
                                  and abs(row["speed_ratio"] - 1) <= SPEED_TOLERANCE)
            rows[preset] = row
        runs[label] = {"types": list(types), "calibration_tokens": calib, "granularity": genes, "seconds": seconds,
                       "rows": rows}
    result.update(presets=presets, empas=runs, load_average_end=[round(x, 2) for x in os.getloadavg()])

    print(f"SmolLM2-135M, {args.heldout_tokens} held-out tokens, llama.cpp logits; tokens/s: 1 thread, "
          f"{args.gen_tokens} new tokens, median of {args.repeats} ({result['hardware']})")
    print(f"{'budget':8} {'types':10} {'preset MB':>9} {'EMPAS MB':>9} {'preset KL':>9} {'EMPAS KL':>9} "
          f"{'KL ratio':>8} {'tok/s ratio':>11}  bar")
    for label, run in runs.items():
        for preset, row in run["rows"].items():
            base = presets[preset]
            print(f"{preset:8} {label:10} {base['bytes'] / 1e6:9.1f} {row['bytes'] / 1e6:9.1f} {base['kl']:9.4f} "
                  f"{row['kl']:9.4f} {row['kl_ratio']:8.2f} {row['speed_ratio']:11.2f}  "
                  f"{'met' if row['bar_met'] else 'MISSED'}")
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
