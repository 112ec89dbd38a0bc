"""``empas profile``: measure (or reuse) the per-gene sensitivity profile and print it."""

from __future__ import annotations

import math
import sys

from storage.workers import CLAIM_TTL_ENV, DEFAULT_CLAIM_TTL, claim_ttl

from .options import add_model_options, add_storage_option, profile_settings
from .output import ProgressBar, print_json


def register(sub) -> None:
    p = sub.add_parser("profile", help="measure how much each layer hurts the model at each quantisation type",
                       description="Measure S(gene, type) on calibration text and persist it in the storage. "
                                   "A rerun reuses the stored profile; an interrupted run resumes.")
    add_model_options(p)
    add_storage_option(p)
    p.add_argument("--check", type=int, default=0, metavar="K",
                   help="also measure K random mixed genomes and report the additive proxy's fidelity")
    p.add_argument("--no-prefix-reuse", action="store_true",
                   help="re-run the whole network for every measurement (slower; for benchmarking)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for this worker (default: torch's, one per core); with W workers on one "
                        "machine give each cores/W (docs/workers.md)")
    p.add_argument("--claim-ttl", type=float, default=None, metavar="SECONDS",
                   help="seconds before a gene claimed by a dead worker is taken over by another "
                        f"(default: ${CLAIM_TTL_ENV} or {DEFAULT_CLAIM_TTL:g}); workers started with the same "
                        "flags and storage split the genes")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(handler=run)


def run(args) -> int:
    from profiling.sensitivity import fidelity_check
    from profiling.streaming import make_runner
    from storage.database import open_database

    from ..jobs.profile import ensure_profile

    if args.check < 0:
        raise ValueError("--check K must be >= 0")
    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads N must be a positive integer (cores / workers on this machine)")
    ttl = claim_ttl(args.claim_ttl)  # a bad --claim-ttl or $EMPAS_CLAIM_TTL fails here, before the model
    settings = profile_settings(args)  # bad options fail here, before the storage or the model
    db = open_database(args.storage)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    progress = ProfileProgress(ProgressBar("profiling", enabled=not args.json))
    job = ensure_profile(settings, db, progress=progress, reuse_prefix=not args.no_prefix_reuse, claim_ttl=ttl)
    progress.close()
    if job.note:
        print(f"empas: {job.note}", file=sys.stderr)
    profile, setup = job.profile, job.setup
    if profile.remote_entries:
        measured = int(profile.valid.sum()) - profile.reused_entries - profile.remote_entries
        print(f"empas: {measured} cells measured here, {profile.remote_entries} by other workers on this storage",
              file=sys.stderr)
    fidelity = None
    if args.check:
        runner = make_runner(setup.loaded.model, setup.inventory, setup.tokens.calibration,
                             importance=setup.importance)
        fidelity = fidelity_check(profile, runner, setup.inventory, setup.quantizer, args.check)
    if args.json:
        print_json(profile_json(profile, fidelity))
    else:
        print_table(profile, fidelity)
    return 0


class ProfileProgress:
    """The progress bar of ``empas profile``: cells done, the last one, and how many came from other
    workers sharing the storage (events arrive from the job's thread and its claim keeper's)."""

    def __init__(self, bar: ProgressBar):
        self.bar, self.remote, self.waiting = bar, 0, 0

    def __call__(self, event) -> None:
        if event.kind == "remote":
            self.remote += 1
        self.waiting = event.held if event.kind == "wait" else (0 if event.kind == "claim" else self.waiting)
        self.bar.update(event.done, event.total, self.label(event), event.eta_seconds)

    def label(self, event) -> str:
        if self.waiting:
            return f"wait: {self.waiting} genes held elsewhere"
        text = progress_label(event)
        return f"{self.remote} remote | {text}" if self.remote else text

    def close(self) -> None:
        self.bar.close()


def progress_label(event) -> str:
    return f"{event.gene}@{event.qtype}" if event.gene and event.qtype else event.gene


def profile_json(profile, fidelity=None) -> dict:
    out = {
        "model": profile.model_id, "model_fingerprint": profile.model_fingerprint,
        "granularity": profile.granularity, "metric": profile.metric, "qtypes": profile.qtypes,
        "quantizer": profile.quantizer, "calibration_tokens": profile.calibration_tokens,
        "include_embeddings": profile.include_embeddings, "memory_basis": profile.memory_basis,
        "corpus": profile.corpus_source,
        "genes": [{"name": n, "params": p} for n, p in zip(profile.gene_names, profile.gene_params)],
        "S": {n: {q: float(v) for q, v, ok in zip(profile.qtypes, row, offered) if ok}
              for n, row, offered in zip(profile.gene_names, profile.sensitivity, profile.offered)},
        "base_loss": profile.base_loss, "base_ppl": profile.base_ppl,
        "fixed_bytes": profile.fixed_bytes, "dense_bytes": profile.dense_bytes(),
        "seconds": profile.seconds, "measured_seconds": profile.measured_seconds,
        "reused_entries": profile.reused_entries, "remote_entries": profile.remote_entries,
        "profile_key": profile.key,
        "mode": profile.mode, "skipped": dict(profile.skipped),
        "dominated": {n: [q for q, d in zip(profile.qtypes, row) if d]
                      for n, row in zip(profile.gene_names, profile.dominated) if row.any()},
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
    w(profile.timing_text() + (f" ({profile.mode} mode)" if profile.metric == "kl" else "") + "\n")
    if profile.skipped_text():
        w(profile.skipped_text() + "\n")
    w("\n")
    cols = [q for q in profile.qtypes if q != profile.unquantized]
    header = f"{'gene':34} {'params':>10} " + " ".join(f"{'S@' + q:>10}" for q in cols)
    w(f"sensitivity S(gene, qtype) [{unit}], most sensitive first (-: the type does not fit the gene; "
      f"skip: dominated, not offered)\n{header}\n")
    rows = profile.table_rows()
    for row in rows[:limit]:
        w(f"{row['gene']:34} {row['params']:>10,} "
          + " ".join(_cell(row[f'S@{q}'], q in row['dominated']) for q in cols) + "\n")
    if len(rows) > limit:
        w(f"... {len(rows) - limit} more genes (use --json for all)\n")
    if fidelity is not None:
        w(f"\nfidelity on {fidelity['genomes']} random mixed genomes (predicted sum of S vs measured KL): "
          f"Spearman {_fmt(fidelity['spearman'])}, Pearson {_fmt(fidelity['pearson'])}\n")


def _cell(v, dominated: bool = False) -> str:
    if dominated:
        return f"{'skip':>10}"
    return f"{'-':>10}" if v is None else f"{v:10.5f}"


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"
