"""``empas export`` (archetypes of a study -> JSON artifacts) and ``empas evaluate`` (measure artifacts
and baselines on held-out text)."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

from .common import ProgressBar, add_storage_option, print_json

ARCHETYPE_CHOICES = ("all", "balanced", "max-accuracy", "max-compression")
DEFAULT_HELDOUT_TOKENS = 2048
EMBEDDED_MODEL_NOTE = ("dense = the embedded SmolLM2-135M's dequantised Q4_1 GGUF weights "
                       "(the baseline every number here is relative to)")


def register(sub) -> None:
    p = sub.add_parser(
        "export", help="write the archetypes of a study's front as JSON artifacts",
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
    p.add_argument("--validate-points", type=int, default=8, metavar="N",
                   help="extra front points measured with --validate for the proxy-vs-measured check (default 8)")
    p.add_argument("--model", default=None, help="model for --validate (default: the study's model id)")
    p.add_argument("--heldout-tokens", type=int, default=DEFAULT_HELDOUT_TOKENS,
                   help=f"held-out tokens for --validate (default {DEFAULT_HELDOUT_TOKENS})")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per held-out sequence (default 128)")
    p.add_argument("--text", default=None, help="held-out text file (default: disjoint from the calibration)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for the artifacts")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(handler=run_export)

    e = sub.add_parser(
        "evaluate", help="measure artifacts (and baselines) on held-out text",
        description="Measure PPL, PPL change, KL to dense, memory (memory model) and average bits of exported "
                    "artifacts on held-out tokens disjoint from calibration, optionally next to dense, uniform "
                    "8/4/3/2-bit and a llama.cpp Q4_K_M-style mix.")
    e.add_argument("files", nargs="*", metavar="FILE.json", help="artifacts from `empas export`")
    e.add_argument("--baselines", action="store_true", help="also measure dense, uniform 8/4/3/2 and the Q4_K_M-style mix")
    e.add_argument("--model", default=None, help="model (default: the artifacts' model id; the embedded one without files)")
    e.add_argument("--group-size", type=int, default=64, help="quantiser group size for baselines without artifacts")
    e.add_argument("--heldout-tokens", type=int, default=DEFAULT_HELDOUT_TOKENS,
                   help=f"held-out tokens (default {DEFAULT_HELDOUT_TOKENS})")
    e.add_argument("--seq-len", type=int, default=128, help="tokens per held-out sequence (default 128)")
    e.add_argument("--text", default=None, help="held-out text file (default: disjoint from the calibration)")
    fmt = e.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print one JSON object")
    fmt.add_argument("--markdown", action="store_true", help="print a Markdown table")
    e.add_argument("--csv", default=None, metavar="FILE", help="also write the rows as CSV")
    e.set_defaults(handler=run_evaluate)


# -- export ---------------------------------------------------------------------------------------

def _positive(value, flag: str) -> None:
    from empas_tui.cli import UserError

    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise UserError(f"{flag} must be a positive number, got {value!r}")


def load_study_front(storage_url: str, study: str):
    from empas_tui.cli import UserError

    try:
        module = importlib.import_module("search.study")
    except ModuleNotFoundError as exc:
        if exc.name in ("search.study", "search"):
            raise UserError("study support (search.study) is not in this build: update EMPAS") from None
        raise
    try:
        return module.load_front(storage_url, study)
    except KeyError:  # optuna's "study not found"
        from storage.urls import redact

        raise UserError(f"no study named {study!r} in {redact(storage_url)}: check --study and --storage") from None


def run_export(args) -> int:
    from empas_tui.cli import UserError
    from search.archetypes import ARCHETYPES, MIB, export_archetypes
    from storage.urls import check_reachable, resolve_storage_url

    _positive(args.max_mib, "--max-mib")
    if args.max_ppl_rise is not None and not (math.isfinite(args.max_ppl_rise) and args.max_ppl_rise >= 0):
        raise UserError(f"--max-ppl-rise must be a percentage >= 0, got {args.max_ppl_rise!r}")
    _positive(args.heldout_tokens, "--heldout-tokens")
    if args.validate_points < 0:
        raise UserError("--validate-points must be >= 0")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder: pass another -o DIR")
    url = resolve_storage_url(args.storage)
    check_reachable(url)
    front = load_study_front(url, args.study)
    archetypes = ARCHETYPES if args.archetype == "all" else (args.archetype,)
    validation = None
    if args.validate:
        validation = _validation_setup(args, front.profile.model_id, front.profile.model_fingerprint,
                                       front.profile.quantizer,
                                       {"corpus": front.profile.corpus_source,
                                        "tokens": front.profile.calibration_tokens})
    bar = ProgressBar("validating", enabled=not args.json, stream=sys.stderr)
    result = export_archetypes(
        front, out, args.study, url, archetypes,
        max_bytes=None if args.max_mib is None else args.max_mib * MIB,
        max_ppl_rise=None if args.max_ppl_rise is None else args.max_ppl_rise / 100.0,
        basis=args.basis, validation=validation, validate_points=args.validate_points,
        progress=lambda ev: bar.update(ev.done, ev.total, ev.name, ev.eta_seconds))
    bar.close()
    if result.validation is not None:
        # Not .json: `empas evaluate DIR/*.json` must see only artifacts. The full JSON is --json's.
        from profiling.validation import render_csv, render_markdown
        from storage.atomic import atomic_write_text

        notes = _model_notes(front.profile.model_id)
        atomic_write_text(out / "validation.md", render_markdown(result.validation, notes=notes))
        atomic_write_text(out / "validation.csv", render_csv(result.validation))
    if args.json:
        print_json({"study": args.study, "written": [str(p) for p in result.paths],
                    "archetypes": [a.to_dict() for a in result.artifacts],
                    "validation": result.validation.to_dict() if result.validation else None})
        return 0
    print_choices(result, front.profile, validated=result.validation is not None)
    if result.validation is not None:
        print()
        from profiling.validation import render_terminal

        print(render_terminal(result.validation, notes=_model_notes(front.profile.model_id)), end="")
    print(f"\nwrote {len(result.paths)} artifact(s) to {out}/"
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
        ppl = math.exp(c.loss)
        w(f"{c.archetype:16} {'-' if trial is None else trial:>6} {c.memory_mib:11.1f} "
          f"{art.metrics['predicted']['average_bits']:8.2f} {ppl:10.2f} ({label}) {100 * c.ppl_rise:8.1f}%  {c.rule}\n")
    if any(c.basis == "predicted" for c in result.choices):
        w("pred. = the additive proxy's prediction on calibration tokens, not a measurement"
          + (": held-out measurements below\n" if validated else " (use --validate to measure on held-out text)\n"))


def _model_notes(model_id: str) -> list[str]:
    return [EMBEDDED_MODEL_NOTE] if model_id == "default" else []


def _validation_setup(args, model_id: str, fingerprint: str | None, quantizer: dict, calibration: dict | None):
    from profiling.models import load_model
    from profiling.validation import prepare_validation
    from storage.artifacts import ArtifactError

    loaded = load_model(args.model or model_id)
    if fingerprint is not None and loaded.fingerprint != fingerprint:
        raise ArtifactError(f"the loaded model {loaded.model_id} (weights {loaded.fingerprint[:12]}) is not the one "
                            f"these genomes were made for ({model_id}, weights {fingerprint[:12]}): "
                            f"pass --model {model_id}")
    return prepare_validation(loaded, quantizer, args.heldout_tokens, args.seq_len, args.text, calibration)


# -- evaluate -------------------------------------------------------------------------------------

def evaluate_directories(paths: list[str], args) -> int:
    """Checkpoint folders are the deploy command's business; this hook hands them over if it exists."""
    from empas_tui.cli import UserError

    try:
        deploy = importlib.import_module("empas_tui.commands.deploy")
    except ModuleNotFoundError as exc:
        if exc.name != "empas_tui.commands.deploy":
            raise
        deploy = None
    if deploy is None or not hasattr(deploy, "evaluate_checkpoints"):
        folder = next(p for p in paths if Path(p).is_dir())
        raise UserError(f"{folder} is a folder: evaluating packed checkpoints is not available in this build; "
                        f"pass artifact .json files")
    return int(deploy.evaluate_checkpoints(paths, args) or 0)


def run_evaluate(args) -> int:
    from empas_tui.cli import UserError
    from profiling.validation import (baseline_genomes, genome_from_mapping, render_csv, render_markdown,
                                      render_terminal, with_prediction)
    from storage.artifacts import ArtifactError, load_artifact
    from storage.atomic import atomic_write_text

    if any(Path(f).is_dir() for f in args.files):
        return evaluate_directories(list(args.files), args)
    if not args.files and not args.baselines:
        raise UserError("nothing to evaluate: pass artifact files (from `empas export`) and/or --baselines")
    _positive(args.heldout_tokens, "--heldout-tokens")
    if args.csv and Path(args.csv).is_dir():
        raise UserError(f"--csv {args.csv} is a folder: pass a file name")
    artifacts = [(f, load_artifact(f)) for f in args.files]  # all validated before the model loads
    first = artifacts[0][1] if artifacts else None
    for f, art in artifacts[1:]:
        if art.model_fingerprint != first.model_fingerprint:
            raise ArtifactError(f"{f} is for another model ({art.model_id}, weights {art.model_fingerprint[:12]}) "
                                f"than {artifacts[0][0]} ({first.model_fingerprint[:12]}): evaluate them separately")
        if art.quantizer != first.quantizer:
            raise ArtifactError(f"{f} uses quantiser {art.quantizer}, {artifacts[0][0]} {first.quantizer}: "
                                f"evaluate them separately")
    quantizer = first.quantizer if first else {"name": "rtn", "group_size": args.group_size}
    calibration = (first.source.get("calibration") if first and isinstance(first.source.get("calibration"), dict)
                   else None)
    model_id = first.model_id if first else None
    setup = _validation_setup(args, model_id or "default", None, quantizer, calibration)
    for f, art in artifacts:
        art.check_model(setup.loaded.fingerprint, where=f" {f}")

    genomes = []
    if args.baselines:
        genomes += baseline_genomes(setup.inventory("linear"))
    for f, art in artifacts:
        predicted = art.metrics.get("predicted", {}) if isinstance(art.metrics.get("predicted"), dict) else {}
        genome = genome_from_mapping(setup.inventory(art.granularity), art.genes, f"{art.archetype} ({Path(f).name})",
                                     kind="artifact", source={"file": str(f), "trial": art.source.get("trial")})
        if isinstance(predicted.get("loss"), (int, float)) and not isinstance(predicted.get("loss"), bool):
            genome = with_prediction(genome, float(predicted["loss"]), predicted.get("dense_loss"))
        genomes.append(genome)

    quiet = args.json or args.markdown
    bar = ProgressBar("evaluating", enabled=not quiet, stream=sys.stderr)
    result = setup.run(genomes, progress=lambda ev: bar.update(ev.done, ev.total, ev.name, ev.eta_seconds))
    bar.close()
    notes = _model_notes(setup.loaded.model_id)
    if args.csv:
        atomic_write_text(args.csv, render_csv(result))
    if args.json:
        print_json({"model": setup.loaded.model_id, "model_fingerprint": setup.loaded.fingerprint,
                    **result.to_dict(), "notes": notes})
    elif args.markdown:
        print(render_markdown(result, notes=notes), end="")
    else:
        print(render_terminal(result, notes=notes), end="")
    return 0
