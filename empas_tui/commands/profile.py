"""``empas profile``: measure (or reuse) the per-gene sensitivity profile and print it."""

from __future__ import annotations

import math
import sys

from .common import ProgressBar, add_model_options, add_storage_option, print_json


def register(sub) -> None:
    p = sub.add_parser("profile", help="measure how much each layer hurts the model at each bit-width",
                       description="Measure S(gene, bits) on calibration text and persist it in the storage. "
                                   "A rerun reuses the stored profile; an interrupted run resumes.")
    add_model_options(p)
    add_storage_option(p)
    p.add_argument("--check", type=int, default=0, metavar="K",
                   help="also measure K random mixed genomes and report the additive proxy's fidelity")
    p.add_argument("--no-prefix-reuse", action="store_true",
                   help="re-run the whole network for every measurement (slower; for benchmarking)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(handler=run)


def open_setup_and_store(args):
    """Validate cheap things first (bits, storage) so bad input fails before a model is loaded."""
    from profiling.quantizer import make_quantizer
    from profiling.sensitivity import parse_bits, prepare
    from storage.profiles import ProfileStore

    bits = parse_bits(args.bits)
    make_quantizer("rtn", args.group_size)
    store = ProfileStore(args.storage)
    setup = prepare(args.model, args.granularity, args.metric, args.group_size, args.calib_tokens,
                    args.heldout_tokens, args.seq_len, args.text)
    return setup, bits, store


def run(args) -> int:
    from profiling.runner import PrefixRunner
    from profiling.sensitivity import fidelity_check, run_profile

    if args.check < 0:
        raise ValueError("--check K must be >= 0")
    setup, bits, store = open_setup_and_store(args)
    bar = ProgressBar("profiling", enabled=not args.json)

    def progress(event) -> None:
        bar.update(event.done, event.total, f"{event.gene}@{event.bits}" if event.gene else "", event.eta_seconds)

    profile = run_profile(setup, bits, store, progress=progress, reuse_prefix=not args.no_prefix_reuse)
    bar.close()
    fidelity = None
    if args.check:
        runner = PrefixRunner(setup.loaded.model, setup.inventory, setup.tokens.calibration)
        fidelity = fidelity_check(profile, runner, setup.inventory, setup.quantizer, args.check)
    if args.json:
        print_json(profile_json(profile, fidelity))
    else:
        print_table(profile, fidelity)
    return 0


def profile_json(profile, fidelity=None) -> dict:
    out = {
        "model": profile.model_id, "model_fingerprint": profile.model_fingerprint,
        "granularity": profile.granularity, "metric": profile.metric, "bits": profile.bits,
        "quantizer": profile.quantizer, "calibration_tokens": profile.calibration_tokens,
        "corpus": profile.corpus_source,
        "genes": [{"name": n, "params": p} for n, p in zip(profile.gene_names, profile.gene_params)],
        "S": {n: dict(zip(map(str, profile.bits), map(float, row)))
              for n, row in zip(profile.gene_names, profile.sensitivity)},
        "base_loss": profile.base_loss, "base_ppl": profile.base_ppl,
        "fixed_bytes": profile.fixed_bytes, "dense_bytes": profile.dense_bytes(),
        "seconds": profile.seconds, "reused_entries": profile.reused_entries, "profile_key": profile.key,
    }
    if fidelity is not None:
        out["fidelity"] = fidelity
    return out


def print_table(profile, fidelity=None, limit: int = 40, stream=None) -> None:
    stream = stream or sys.stdout
    unit = "KL nats/token" if profile.metric == "kl" else "Fisher est. of KL"
    w = stream.write
    w(f"model {profile.model_id}  ({profile.granularity} genes: {profile.n_genes}, metric {profile.metric})\n")
    w(f"calibration: {profile.calibration_tokens} tokens of {profile.corpus_source}; "
      f"dense loss {profile.base_loss:.4f} (PPL {profile.base_ppl:.2f}) measured\n")
    reused = f", {profile.reused_entries} entries reused from storage" if profile.reused_entries else ""
    w(f"took {profile.seconds:.1f}s{reused}\n\n")
    cols = [b for b in profile.bits if b != 16]
    header = f"{'gene':34} {'params':>10} " + " ".join(f"{'S@' + str(b):>10}" for b in cols)
    w(f"sensitivity S(gene, bits) [{unit}], most sensitive first\n{header}\n")
    rows = profile.table_rows()
    for row in rows[:limit]:
        w(f"{row['gene']:34} {row['params']:>10,} " + " ".join(f"{row[f'S@{b}']:10.5f}" for b in cols) + "\n")
    if len(rows) > limit:
        w(f"... {len(rows) - limit} more genes (use --json for all)\n")
    if fidelity is not None:
        w(f"\nfidelity on {fidelity['genomes']} random mixed genomes (predicted sum of S vs measured KL): "
          f"Spearman {_fmt(fidelity['spearman'])}, Pearson {_fmt(fidelity['pearson'])}\n")


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"
