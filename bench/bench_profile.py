"""Benchmark: profiling cost with and without prefix reuse, Fisher cost, and proxy fidelity.

Per-block KL profile of the embedded SmolLM2-135M, bits {2,3,4,8}, 512 calibration tokens (default).
Each (gene, bits) measurement is timed both ways *interleaved* (prefix reuse, then a full forward), so
both see the same machine load and the ratio is fair on a shared machine; the two KL values are
checked to agree. Then the Fisher profile is timed, and both profiles' additive predictions are
compared with measured KL on random mixed genomes (Spearman, Pearson).

    python bench/bench_profile.py [--calib-tokens 512] [--genomes 8] [--out bench/results/profile.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from profiling.runner import PrefixRunner  # noqa: E402
from profiling.sensitivity import fidelity_check, prepare, run_profile  # noqa: E402
from storage.atomic import atomic_write_text  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--bits", default="2,3,4,8")
    ap.add_argument("--calib-tokens", type=int, default=512)
    ap.add_argument("--genomes", type=int, default=8)
    ap.add_argument("--gene-stride", type=int, default=1,
                    help="time every k-th gene only (spread over the depth, so the ratio stays fair); "
                         "the Fisher profile and the fidelity check always use every gene")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "profile.json"))
    args = ap.parse_args()
    bits = [int(b) for b in args.bits.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    setup = prepare(args.model, "block", "kl", 64, args.calib_tokens, 512, 128)
    load_s = time.perf_counter() - t0
    model, inv, q = setup.loaded.model, setup.inventory, setup.quantizer
    fast = PrefixRunner(model, inv, setup.tokens.calibration, reuse_prefix=True)
    slow = PrefixRunner(model, inv, setup.tokens.calibration, reuse_prefix=False)
    assert fast.reuse_prefix, "prefix reuse unavailable for this model"

    reuse_s = full_s = 0.0
    max_rel_diff = 0.0
    timed_genes = list(range(0, len(inv.genes), args.gene_stride))
    for i in timed_genes:
        gene = inv.genes[i]
        for b in bits:
            t = time.perf_counter()
            a = fast.kl_with([gene], [b], q)
            reuse_s += time.perf_counter() - t
            t = time.perf_counter()
            c = slow.kl_with([gene], [b], q)
            full_s += time.perf_counter() - t
            max_rel_diff = max(max_rel_diff, abs(a - c) / max(abs(c), 1e-12))
        print(f"\rgene {i + 1}/{len(inv.genes)} (timed {len(timed_genes)})  reuse {reuse_s:6.1f}s  full {full_s:6.1f}s", end="", file=sys.stderr)
    print(file=sys.stderr)

    kl_profile = run_profile(setup, bits, runner=fast)
    fisher_setup = prepare(args.model, "block", "fisher", 64, args.calib_tokens, 512, 128, loaded=setup.loaded)
    t = time.perf_counter()
    fisher_profile = run_profile(fisher_setup, bits, runner=fast)
    fisher_s = time.perf_counter() - t

    fid_kl = fidelity_check(kl_profile, fast, inv, q, args.genomes, seed=1)
    fid_fisher = fidelity_check(fisher_profile, fast, inv, q, args.genomes, seed=1)

    result = {
        "model": setup.loaded.model_id, "genes": len(inv.genes), "bits": bits,
        "calibration_tokens": setup.tokens.calibration_tokens, "timed_genes": timed_genes,
        "measurements_timed": len(timed_genes) * len(bits),
        "load_seconds": load_s, "kl_seconds_prefix_reuse": reuse_s, "kl_seconds_full_forward": full_s,
        "speedup": full_s / reuse_s, "max_relative_difference": max_rel_diff, "fisher_seconds": fisher_s,
        "fidelity_kl": {k: fid_kl[k] for k in ("genomes", "spearman", "pearson")},
        "fidelity_fisher": {k: fid_fisher[k] for k in ("genomes", "spearman", "pearson")},
        "fisher_vs_kl_profile_spearman": _spearman(kl_profile, fisher_profile),
        "hardware": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
    }
    atomic_write_text(args.out, json.dumps(result, indent=2))
    print(f"\nSmolLM2 per-block KL profile, bits {bits}, {result['calibration_tokens']} calibration tokens "
          f"({result['measurements_timed']} timed measurements, genes {timed_genes[0]}..{timed_genes[-1]} step {args.gene_stride}), {result['hardware']}")
    print(f"{'what':44} {'value':>12}")
    rows = [
        ("KL profile, full forwards (s)", f"{full_s:.1f}"),
        ("KL profile, prefix reuse (s)", f"{reuse_s:.1f}"),
        ("speed-up of prefix reuse", f"{result['speedup']:.2f}x"),
        ("max relative KL difference reuse vs full", f"{max_rel_diff:.1e}"),
        ("Fisher profile (s)", f"{fisher_s:.1f}"),
        (f"fidelity KL proxy, Spearman ({args.genomes} genomes)", f"{fid_kl['spearman']:.3f}"),
        ("fidelity KL proxy, Pearson", f"{fid_kl['pearson']:.3f}"),
        (f"fidelity Fisher proxy, Spearman ({args.genomes} genomes)", f"{fid_fisher['spearman']:.3f}"),
        ("fidelity Fisher proxy, Pearson", f"{fid_fisher['pearson']:.3f}"),
        ("Fisher vs KL sensitivities @2-bit, Spearman", f"{result['fisher_vs_kl_profile_spearman']:.3f}"),
    ]
    for name, value in rows:
        print(f"{name:44} {value:>12}")
    print(f"wrote {args.out}")


def _spearman(a, b) -> float:
    from profiling.sensitivity import correlations

    return correlations(list(a.sensitivity[:, 0]), list(b.sensitivity[:, 0]))["spearman"]


if __name__ == "__main__":
    main()
