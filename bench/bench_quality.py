"""Quality bar: searched genomes vs uniform and llama.cpp-style baselines on held-out text (issue 4).

On the embedded SmolLM2-135M (dense = its dequantised Q4_1 weights): a KL profile per block and per
linear (bits {2,3,4,8,16}, 512 calibration tokens, RTN group 64; stored in a bench SQLite file, so a
rerun measures nothing twice), the exact Pareto front of the additive proxy for each, then, on held-out
tokens disjoint from calibration (the default corpus's other modules):

- baselines: dense, uniform 8/4/3/2-bit, the llama.cpp Q4_K_M-style mix (per linear);
- front genomes at each baseline's memory and midway between uniform-3 and uniform-4 memory, chosen
  two ways: **proxy** (lowest predicted loss within the memory) and **refined** (of the front points of
  both granularities within ``--window`` of the target, the ``--refine`` spread over it are measured on
  the *calibration* tokens and the lowest measured KL is kept; the held-out set is never used to choose).

Bars (issue 4): every baseline dominated (a front genome with no more memory and no higher held-out
PPL); at the mix's memory >= 15% of the mix's PPL gap to dense closed; midway between uniform 3 and 4 bits
>= 75% of the uniform-3 -> uniform-4 PPL gap closed.

    python bench/bench_quality.py [--heldout-tokens 2048] [--refine 8] [--out bench/results/quality.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from profiling.runner import PrefixRunner  # noqa: E402
from profiling.sensitivity import correlations, prepare, run_profile  # noqa: E402
from profiling.validation import (MIB, HeldoutEvaluator, baseline_genomes, genome_from_genes,  # noqa: E402
                                  heldout_tokens, measured_calibration_kl, render_markdown, render_terminal, validate,
                                  with_prediction)
from search.exact_front import front_for_space  # noqa: E402
from search.space import SearchSpace  # noqa: E402
from storage.atomic import atomic_write_text  # noqa: E402
from storage.profiles import ProfileStore  # noqa: E402

HERE = Path(__file__).resolve().parent
#: The profile key hashes the token sets, held-out included; profiles are built with this fixed held-out
#: size so that changing --heldout-tokens reuses them (the held-out set is then cut separately).
PROFILE_HELDOUT_TOKENS = 2048


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def near_target(memory: np.ndarray, target: float, count: int, window: float) -> list[int]:
    """Front indices with memory in [target*(1-window), target], ``count`` spread over that range,
    always including the largest (the proxy's own pick)."""
    idx = np.flatnonzero((memory <= target) & (memory >= target * (1 - window)))
    if idx.size == 0:
        idx = np.flatnonzero(memory <= target)[-1:]
    idx = idx[np.argsort(memory[idx])]
    if count <= 1 or idx.size <= count:
        return [int(i) for i in (idx if count > 1 else idx[-1:])]
    picks = np.unique(np.linspace(0, idx.size - 1, count).round().astype(int))
    return [int(idx[p]) for p in picks]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--bits", default="2,3,4,8,16")
    ap.add_argument("--calib-tokens", type=int, default=512)
    ap.add_argument("--heldout-tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--granularities", default="block,linear")
    ap.add_argument("--refine", type=int, default=8, help="front points measured on calibration per target (0: off)")
    ap.add_argument("--window", type=float, default=0.03, help="refinement window below each target, fraction of it")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared machine, more threads than free cores make "
                         "element-wise ops over 10x slower)")
    ap.add_argument("--db", default=str(HERE / "results" / "quality.db"))
    ap.add_argument("--out", default=str(HERE / "results" / "quality.json"))
    args = ap.parse_args()
    bits = [int(b) for b in args.bits.split(",")]
    grans = args.granularities.split(",")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    # -- profiles (persisted: a rerun reuses every entry) ------------------------------------------
    store = ProfileStore(args.db)
    setups, profiles, spaces = {}, {}, {}
    loaded = None
    for gran in grans:
        t = time.perf_counter()
        setups[gran] = setup = prepare(args.model, gran, "kl", args.group_size, args.calib_tokens,
                                       PROFILE_HELDOUT_TOKENS, args.seq_len, loaded=loaded)
        loaded = setup.loaded
        last = [0.0]

        def progress(ev, gran=gran, last=last):
            if ev.kind == "entry" and time.perf_counter() - last[0] > 30:
                last[0] = time.perf_counter()
                log(f"{gran} profile {ev.done}/{ev.total} ETA {ev.eta_seconds or 0:.0f}s")

        profiles[gran] = run_profile(setup, bits, store, progress=progress)
        spaces[gran] = SearchSpace.from_profile(profiles[gran])
        timings[f"profile_{gran}_s"] = time.perf_counter() - t
        log(f"{gran} profile: {profiles[gran].n_genes} genes, {profiles[gran].reused_entries} entries reused, "
            f"{timings[f'profile_{gran}_s']:.0f}s")
    first = setups[grans[0]]
    model, quantizer = loaded.model, first.quantizer
    calib = first.tokens.calibration
    heldout, heldout_source = heldout_tokens(loaded.tokenizer, args.heldout_tokens, args.seq_len)
    lin_inv = setups["linear"].inventory if "linear" in setups else None
    if lin_inv is None:
        from profiling.inventory import build_inventory

        lin_inv = build_inventory(model, "linear")

    # -- exact fronts --------------------------------------------------------------------------------
    fronts = {}
    for gran in grans:
        t = time.perf_counter()
        fronts[gran] = front_for_space(spaces[gran])
        timings[f"front_{gran}_s"] = time.perf_counter() - t
        log(f"{gran} exact front: {len(fronts[gran])} points in {timings[f'front_{gran}_s']:.1f}s")

    # -- baselines on held-out ----------------------------------------------------------------------
    t = time.perf_counter()
    evaluator = HeldoutEvaluator(model, lin_inv, heldout, batch_sequences=4, source=heldout_source)
    base = validate(model, lin_inv, heldout, quantizer, baseline_genomes(lin_inv), evaluator=evaluator,
                    tokens_source=evaluator.source)
    timings["baselines_s"] = time.perf_counter() - t
    brow = {r.name: r for r in base.rows}
    log("baselines: " + ", ".join(f"{r.name} {r.ppl:.2f} @ {r.memory_mib:.1f} MiB" for r in base.rows))

    targets = {name: brow[name].memory_bytes for name in brow}
    targets["midway-3-4"] = (brow["uniform-3"].memory_bytes + brow["uniform-4"].memory_bytes) / 2

    # -- candidates at each target; calibration-measured refinement ----------------------------------
    runner = PrefixRunner(model, lin_inv, calib) if args.refine > 0 else None
    cal_cache: dict[tuple, float] = {}
    selections = {}
    t_ref = time.perf_counter()
    for tname, target in targets.items():
        entry = {"target_bytes": int(target), "target_mib": target / MIB}
        pool = []  # (granularity, index)
        for gran in grans:
            f = fronts[gran]
            proxy_idx = int(np.flatnonzero(f.memory <= target)[-1])
            entry[f"proxy_{gran}"] = proxy_idx
            if args.refine > 0:
                pool += [(gran, i) for i in near_target(f.memory, target, args.refine, args.window)]
        if args.refine > 0:
            measured = []
            for gran, i in pool:
                key = (gran, tuple(fronts[gran].genomes[i]))
                if key not in cal_cache:
                    g = genome_from_genes(setups[gran].inventory, spaces[gran].bits_of(fronts[gran].genomes[i]), "c")
                    cal_cache[key] = measured_calibration_kl(runner, [g], quantizer)[0]
                measured.append({"granularity": gran, "index": i, "memory_bytes": int(fronts[gran].memory[i]),
                                 "predicted_kl": float(fronts[gran].loss[i] - spaces[gran].base_loss),
                                 "calibration_kl": cal_cache[key]})
            best = min(measured, key=lambda c: (c["calibration_kl"], c["memory_bytes"]))
            entry["candidates"] = measured
            entry["refined"] = (best["granularity"], best["index"])
        selections[tname] = entry
        log(f"target {tname}: {target / MIB:.1f} MiB" + (f", refined from {len(pool)} candidates" if pool else ""))
    timings["refine_calibration_s"] = time.perf_counter() - t_ref

    # -- front genomes on held-out --------------------------------------------------------------------
    genomes, seen = [], {}
    for tname, entry in selections.items():
        picks = [(f"proxy-{gran}", gran, entry[f"proxy_{gran}"]) for gran in grans]
        if "refined" in entry:
            picks.append(("refined", *entry["refined"]))
        for label, gran, i in picks:
            key = (gran, tuple(fronts[gran].genomes[i]))
            name = f"{label} @ {tname}"
            entry.setdefault("rows", {})[label] = name
            if key in seen:
                entry["rows"][label] = seen[key]
                continue
            seen[key] = name
            g = genome_from_genes(setups[gran].inventory, spaces[gran].bits_of(fronts[gran].genomes[i]), name,
                                  kind=f"front ({gran})")
            genomes.append(with_prediction(g, float(fronts[gran].loss[i]), spaces[gran].base_loss))
    t = time.perf_counter()
    found = validate(model, lin_inv, heldout, quantizer, genomes, evaluator=evaluator, tokens_source=evaluator.source,
                     progress=lambda ev: ev.kind == "genome" and log(f"held-out {ev.done}/{ev.total} {ev.name}: "
                                                                     f"PPL {ev.row.ppl:.2f}"))
    timings["front_heldout_s"] = time.perf_counter() - t
    frow = {r.name: r for r in found.rows}

    # -- bars ---------------------------------------------------------------------------------------------
    def chosen_row(tname: str, label: str):
        return frow[selections[tname]["rows"][label]]

    labels = [f"proxy-{g}" for g in grans] + (["refined"] if args.refine > 0 else [])
    dense, mix, u3, u4 = brow["dense"], brow["q4_k_m-mix"], brow["uniform-3"], brow["uniform-4"]
    bars: dict = {"dominance": {}, "mix_gap_closed": {}, "midway_gap_closed": {}}
    for label in labels:
        dom = {}
        for b in base.rows:
            r = chosen_row(b.name, label)
            dom[b.name] = {"front_genome": r.name, "front_mib": r.memory_mib, "front_ppl": r.ppl,
                           "baseline_mib": b.memory_mib, "baseline_ppl": b.ppl,
                           "dominates": bool(r.memory_bytes <= b.memory_bytes and r.ppl <= b.ppl * (1 + 1e-9))}
        bars["dominance"][label] = dom
        r = chosen_row("q4_k_m-mix", label)
        bars["mix_gap_closed"][label] = {"front_ppl": r.ppl, "front_mib": r.memory_mib,
                                         "closed": (mix.ppl - r.ppl) / (mix.ppl - dense.ppl)}
        r = chosen_row("midway-3-4", label)
        bars["midway_gap_closed"][label] = {"front_ppl": r.ppl, "front_mib": r.memory_mib,
                                            "closed": (u3.ppl - r.ppl) / (u3.ppl - u4.ppl)}
    # proxy vs measured over every front genome measured on held-out
    pred = [r.predicted_loss for r in found.rows]
    meas_loss = [r.loss for r in found.rows]
    fidelity = {"points": len(pred), **correlations(pred, meas_loss)}
    kl_fid = {"points": len(pred), **correlations([p - spaces[grans[0]].base_loss for p in pred],
                                                  [r.kl for r in found.rows])}
    refine_fid = None
    if args.refine > 0:
        cands = [c for e in selections.values() for c in e.get("candidates", [])]
        refine_fid = {"points": len(cands), **correlations([c["predicted_kl"] for c in cands],
                                                           [c["calibration_kl"] for c in cands])}
    timings["total_s"] = time.perf_counter() - started

    # -- report ----------------------------------------------------------------------------------------
    from profiling.validation import ValidationResult

    table = ValidationResult(rows=base.rows + found.rows, dense_loss=base.dense_loss, heldout_tokens=base.heldout_tokens,
                             tokens_source=base.tokens_source, quantizer=base.quantizer,
                             fidelity=found.fidelity)
    notes = ["dense = the embedded SmolLM2-135M's dequantised Q4_1 GGUF weights",
             f"MiB include {lin_inv.fixed_bytes / MIB:.1f} MiB of 16-bit non-gene parameters (tied embedding, norms)"]
    print(render_terminal(table, notes))
    print("bars:")
    for label in labels:
        d = bars["dominance"][label]
        missed = [k for k, v in d.items() if not v["dominates"]]
        print(f"  {label:13} dominates all baselines: {'yes' if not missed else 'no (' + ', '.join(missed) + ')'}; "
              f"mix gap closed {100 * bars['mix_gap_closed'][label]['closed']:.1f}% (bar 15%); "
              f"midway gap closed {100 * bars['midway_gap_closed'][label]['closed']:.1f}% (bar 75%)")
    print(f"proxy vs measured held-out loss over {fidelity['points']} front genomes: Spearman "
          f"{fidelity['spearman']:.3f}, Pearson {fidelity['pearson']:.3f}")
    if refine_fid:
        print(f"predicted vs calibration-measured KL over {refine_fid['points']} refinement candidates: Spearman "
              f"{refine_fid['spearman']:.3f}, Pearson {refine_fid['pearson']:.3f}")
    print("timings: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))

    result = {
        "command": "python bench/bench_quality.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "settings": {"model": loaded.model_id, "bits": bits, "calib_tokens": args.calib_tokens,
                     "heldout_tokens": int(heldout.numel()), "seq_len": args.seq_len, "quantizer": quantizer.settings(),
                     "granularities": grans, "refine": args.refine, "window": args.window,
                     "heldout_source": evaluator.source, "fixed_bytes": lin_inv.fixed_bytes},
        "profiles": {g: {"genes": profiles[g].n_genes, "reused_entries": profiles[g].reused_entries,
                         "base_loss": profiles[g].base_loss, "front_points": len(fronts[g])} for g in grans},
        "baselines": [r.to_dict() for r in base.rows],
        "front_rows": [r.to_dict() for r in found.rows],
        "selections": {k: {kk: (list(vv) if isinstance(vv, tuple) else vv) for kk, vv in v.items()}
                       for k, v in selections.items()},
        "bars": bars, "proxy_vs_measured_loss": fidelity, "proxy_vs_measured_kl": kl_fid,
        "proxy_vs_calibration_kl": refine_fid, "timings_s": timings,
        "markdown": render_markdown(table, notes),
    }
    atomic_write_text(args.out, json.dumps(_clean(result), indent=2, allow_nan=False, default=_json_default) + "\n")
    log(f"wrote {args.out}")


def _clean(o):
    """NaN/inf (e.g. a correlation over constant values) become null: JSON has no NaN."""
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o) if math.isfinite(float(o)) else None
    raise TypeError(type(o).__name__)


if __name__ == "__main__":
    main()
