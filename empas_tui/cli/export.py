"""``empas export``: the archetypes of a study's front, chosen, optionally validated, and written."""

from __future__ import annotations

import math
import sys

from search.export_settings import ARCHETYPE_CHOICES, DEFAULT_HELDOUT_TOKENS, DEFAULT_VALIDATE_POINTS

from .output import ProgressBar, print_json
from .options import add_storage_option


def register(sub) -> None:
    p = sub.add_parser(
        "export", help="write the archetypes of a study's front: artifacts (JSON) and GGUF files",
        description="Choose Max Accuracy, Balanced (knee) and Max Compression (smallest under a PPL-rise cap) "
                    "from a study's Pareto front and write one JSON artifact each. Measured values decide "
                    "where the study has them; otherwise the additive proxy's predictions do (labelled).")
    add_storage_option(p)
    p.add_argument("--study", required=True, help="study name (see `empas search`)")
    p.add_argument("--archetype", choices=ARCHETYPE_CHOICES, default="all", help="which archetype(s) (default all)")
    p.add_argument("--max-mib", type=float, default=None, metavar="X",
                   help="only consider genomes of at most X MiB (best accuracy under X MiB = max-accuracy)")
    p.add_argument("--max-ppl-rise", type=float, default=None, metavar="PCT",
                   help="only consider genomes whose PPL rise is at most PCT %% (also max-compression's cap; "
                        "default cap 25)")
    p.add_argument("--basis", choices=["auto", "mixed", "predicted"], default="auto",
                   help="auto: measured values decide when the front has any (default); mixed: per point; "
                        "predicted: ignore measurements")
    p.add_argument("--validate", action="store_true",
                   help="also measure each archetype (and --validate-points front points) on held-out text")
    p.add_argument("--format", choices=("json", "gguf"), default=None,
                   help="gguf: also write DIR/<archetype>.gguf (llama.cpp runs it) and "
                        "DIR/<archetype>.tensor-types.txt (for llama-quantize --tensor-type-file); "
                        "default gguf for a ggml study, json for rtn (an artifact .json is always written)")
    p.add_argument("--refine", type=int, default=None, metavar="N",
                   help="measure the N front points nearest each archetype on the calibration text (all genes "
                        "quantised together) and choose on the measurements (default 8 for a proxy study; 0: no)")
    p.add_argument("--validate-points", type=int, default=DEFAULT_VALIDATE_POINTS, metavar="N",
                   help=f"extra front points measured with --validate for the proxy-vs-measured check "
                        f"(default {DEFAULT_VALIDATE_POINTS})")
    p.add_argument("--model", default=None, help="model for --validate (default: the study's model id)")
    p.add_argument("--heldout-tokens", type=int, default=DEFAULT_HELDOUT_TOKENS,
                   help=f"held-out tokens for --validate (default {DEFAULT_HELDOUT_TOKENS})")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per held-out sequence (default 128)")
    p.add_argument("--text", default=None, help="held-out text file (default: disjoint from the calibration)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for the artifacts")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(handler=run_export)



# -- export ---------------------------------------------------------------------------------------

def export_settings(args):
    from search.export_settings import ExportSettings

    return ExportSettings(study=args.study, output=args.output, archetype=args.archetype, max_mib=args.max_mib,
                          max_ppl_rise=args.max_ppl_rise, basis=args.basis, validate=args.validate,
                          refine=args.refine, format=args.format,
                          validate_points=args.validate_points, model=args.model,
                          heldout_tokens=args.heldout_tokens, seq_len=args.seq_len,
                          text_file=args.text).validate_settings()


def run_export(args) -> int:
    from storage.database import open_database

    from ..jobs.export import export_job

    settings = export_settings(args)
    db = open_database(args.storage, create=False)
    bar = ProgressBar("validating", enabled=not args.json, stream=sys.stderr)
    result = export_job(settings, db, progress=lambda ev: bar.update(ev.done, ev.total, ev.name, ev.eta_seconds))
    bar.close()
    for name, why in result.skipped.items():
        print(f"empas: {name} not exported: {why}", file=sys.stderr)
    if args.json:
        print_json({"study": args.study, "written": [str(p) for p in result.paths],
                    "archetypes": [a.to_dict() for a in result.artifacts], "skipped": result.skipped,
                    "validation": result.validation.to_dict() if result.validation else None})
        return 0
    print_choices(result, result.front.profile, validated=result.validation is not None)
    if result.validation is not None:
        from profiling.evaluation_report import render_terminal

        print()
        print(render_terminal(result.validation, notes=result.notes), end="")
    n_artifacts = len(result.artifacts)
    print(f"\nwrote {n_artifacts} artifact(s) to {settings.output}/"
          + (" with validation.md and validation.csv" if result.validation is not None else ""))
    return 0


def print_choices(result, profile, stream=None, validated: bool = False) -> None:
    w = (stream or sys.stdout).write
    w(f"model {profile.model_id} ({profile.granularity} genes: {profile.n_genes}); "
      f"dense loss {profile.base_loss:.4f} on {profile.calibration_tokens} calibration tokens\n")
    w(f"{'archetype':16} {'trial':>6} {'MiB (model)':>11} {'avg bits':>8} {'PPL':>16} {'PPL rise':>9}  rule\n")
    for c, p, art in zip(result.choices, result.points, result.artifacts):
        trial = getattr(p, "trial_number", None)
        label = "meas." if c.basis == "measured" else "pred."
        ppl = math.exp(min(c.loss, 700.0))
        w(f"{c.archetype:16} {'-' if trial is None else trial:>6} {c.memory_mib:11.1f} "
          f"{art.metrics['predicted']['average_bits']:8.2f} {ppl:10.2f} ({label}) {100 * c.ppl_rise:8.1f}%  {c.rule}\n")
    if any(c.basis == "predicted" for c in result.choices):
        w("pred. = the additive proxy's prediction on calibration tokens, not a measurement"
          + (": held-out measurements below\n" if validated else " (use --validate to measure on held-out text)\n"))
