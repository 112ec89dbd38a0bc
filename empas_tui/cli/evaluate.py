"""``empas evaluate``: measure artifacts, packed checkpoints (and baselines) on held-out text."""

from __future__ import annotations

import sys
from pathlib import Path

from profiling import settings as ps
from search.export_settings import DEFAULT_HELDOUT_TOKENS

from .options import add_memory_options, check_placement
from .output import ProgressBar, print_json


def evaluation_placement(args):
    """The device/dtype/memory flags as settings (None when none was given: float32 on the CPU)."""
    from profiling.settings import ProfileSettings

    given = {k: getattr(args, k, None) for k in ("device", "dtype", "max_memory_mib", "stream")}
    if all(v is None for v in given.values()):
        return None
    settings = ProfileSettings(**{k: v for k, v in given.items() if v is not None}).validate()
    if args.model:
        check_placement(settings.with_(model=args.model))
    else:
        from profiling.devices import resolve_device

        resolve_device(settings.device, settings.dtype)
    return settings


def register(sub) -> None:
    e = sub.add_parser(
        "evaluate", help="measure artifacts (and baselines) on held-out text",
        description="Measure PPL, PPL change, KL to dense, memory (memory model) and average bits of exported "
                    "artifacts on held-out tokens disjoint from calibration, optionally next to baselines: for RTN "
                    "dense, uniform 8/4/3/2-bit and a llama.cpp Q4_K_M-style mix; for the ggml quantiser F16 and "
                    "llama.cpp's presets. GGUF files (--engine llamacpp) run in llama.cpp: PPL and KL to the "
                    "model's F16 GGUF from llama.cpp's logits, beside PyTorch on the same file's weights.")
    e.add_argument("files", nargs="*", metavar="FILE",
                   help="artifacts (.json) from `empas export`, or .gguf files (measured in llama.cpp)")
    e.add_argument("--engine", choices=ENGINES, default=None,
                   help="pytorch: fake-quantise artifacts in PyTorch; llamacpp: run .gguf files in llama.cpp, "
                        "beside PyTorch on their weights (default: from the files)")
    e.add_argument("--baselines", action="store_true",
                   help="also measure baselines: RTN dense/uniform/Q4_K_M-style mix, or for ggml (and llamacpp) "
                        "F16 and llama.cpp's presets Q8_0 ... Q2_K")
    e.add_argument("--quantizer", choices=("rtn", "ggml"), default=None,
                   help="the quantiser of baselines measured without artifacts (default rtn)")
    e.add_argument("--model", default=None, help="model (default: the artifacts' model id; the embedded one without files)")
    e.add_argument("--group-size", type=int, default=64, help="quantiser group size for baselines without artifacts")
    e.add_argument("--heldout-tokens", type=int, default=DEFAULT_HELDOUT_TOKENS,
                   help=f"held-out tokens (default {DEFAULT_HELDOUT_TOKENS})")
    e.add_argument("--seq-len", type=int, default=128, help="tokens per held-out sequence (default 128)")
    e.add_argument("--text", default=None, help="held-out text file (default: disjoint from the calibration)")
    e.add_argument("--device", default=None, help="auto, cpu, cuda[:N] or mps (default auto; EMPAS's own engine)")
    e.add_argument("--dtype", default=None, choices=ps.DTYPES, help="compute dtype (default auto)")
    add_memory_options(e)
    e.add_argument("--threads", type=int, default=None,
                   help="llamacpp engine: llama.cpp threads (default: half the logical CPUs)")
    e.add_argument("--tokenizer-pre", default=None, metavar="NAME",
                   help="llamacpp engine: llama.cpp's pre-tokenizer name, needed only to write the F16 reference "
                        "of a model with a GPT-2-style BPE tokenizer and no GGUF to copy metadata from")
    fmt = e.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print one JSON object")
    fmt.add_argument("--markdown", action="store_true", help="print a Markdown table")
    e.add_argument("--csv", default=None, metavar="FILE", help="also write the rows as CSV")
    e.set_defaults(handler=run_evaluate)


ENGINES = ("pytorch", "llamacpp")


def evaluation_engine(args) -> str:
    """The engine the files ask for: GGUFs run in llama.cpp, artifacts in PyTorch; one line when the
    files and --engine disagree."""
    from ..jobs.run import ARTIFACT_SUFFIX
    from .errors import UserError

    ggufs = [f for f in args.files if _is_gguf(f)]
    others = [f for f in args.files if f not in ggufs]
    if args.engine == "pytorch" and ggufs:
        raise UserError(f"{ggufs[0]} is a GGUF: drop --engine pytorch (a GGUF is measured in llama.cpp and, on its "
                        f"weights, in PyTorch), or pass the artifact {Path(ggufs[0]).with_suffix(ARTIFACT_SUFFIX).name}")
    if args.engine is None and ggufs and others:
        raise UserError(f"{others[0]} and {ggufs[0]} need different engines: evaluate artifacts and GGUF files in "
                        f"separate runs (a GGUF's artifact beside it is read anyway)")
    return args.engine or ("llamacpp" if ggufs else "pytorch")


def _is_gguf(path: str) -> bool:
    from profiling.deploy.llamacpp import GGUF_MAGIC

    p = Path(path)
    if p.suffix.lower() == ".gguf":
        return True
    try:
        with open(p, "rb") as fh:
            return fh.read(4) == GGUF_MAGIC
    except OSError:
        return False


# -- evaluate -------------------------------------------------------------------------------------

def run_evaluate(args) -> int:
    from profiling.baselines import baseline_genomes
    from profiling.evaluation import with_prediction
    from profiling.evaluation_report import render_csv, render_markdown, render_terminal
    from profiling.genome import genome_from_mapping
    from storage.artifacts import ArtifactError, load_artifact
    from storage.atomic import atomic_write_text

    from ..jobs.export import model_notes
    from ..jobs.models import load_checked, quantizer_for
    from .errors import UserError

    if args.csv and Path(args.csv).is_dir():
        raise UserError(f"--csv {args.csv} is a folder: pass a file name")
    if evaluation_engine(args) == "llamacpp":
        from .gguf import run_evaluate_gguf

        return run_evaluate_gguf(args)
    if any(Path(f).is_dir() for f in args.files):
        from .deploy import evaluate_checkpoints

        return evaluate_checkpoints(list(args.files), args)
    if not args.files and not args.baselines:
        raise UserError("nothing to evaluate: pass artifact files (from `empas export`) and/or --baselines")
    if not (isinstance(args.heldout_tokens, int) and args.heldout_tokens > 0):
        raise UserError(f"--heldout-tokens must be a positive number, got {args.heldout_tokens!r}")
    placement = evaluation_placement(args)  # device, dtype and memory cap checked before anything loads
    artifacts = [(f, load_artifact(f)) for f in args.files]  # all validated before the model loads
    first = artifacts[0][1] if artifacts else None
    for f, art in artifacts[1:]:
        if art.model_fingerprint != first.model_fingerprint:
            raise ArtifactError(f"{f} is for another model ({art.model_id}, weights {art.model_fingerprint[:12]}) "
                                f"than {artifacts[0][0]} ({first.model_fingerprint[:12]}): evaluate them separately")
        if art.quantizer != first.quantizer:
            raise ArtifactError(f"{f} uses quantiser {art.quantizer}, {artifacts[0][0]} {first.quantizer}: "
                                f"evaluate them separately")
    if first:
        identity = first.quantizer
    else:
        identity = {"name": "ggml"} if args.quantizer == "ggml" else {"name": "rtn", "group_size": args.group_size}
    ggml = identity.get("name") == "ggml"
    qtypes = sorted({q for _, a in artifacts for q in a.qtypes}) if first else ([] if ggml else ["2", "3", "4", "6", "8", "16"])
    if ggml and args.baselines:
        from ..jobs.run import PRESET_QTYPES

        qtypes = sorted(set(qtypes) | set(PRESET_QTYPES))
    quantizer = quantizer_for({}, identity, qtypes)
    calibration = (first.source.get("calibration") if first and isinstance(first.source.get("calibration"), dict)
                   else None)
    from profiling.evaluation import prepare_validation

    loaded = load_checked(args.model, first.model_id if first else "default", None, placement)
    for f, art in artifacts:
        art.check_model(loaded.fingerprint, where=f" {f}")
    include_embeddings = any("embed_tokens" in a.genes for _, a in artifacts) or (ggml and not artifacts)
    setup = prepare_validation(loaded, quantizer, args.heldout_tokens, args.seq_len, args.text, calibration,
                               include_embeddings=include_embeddings)
    genomes, presets = [], []
    if args.baselines and ggml:
        from ..jobs.run import preset_genomes

        presets = preset_genomes(loaded.model, setup.inventory("linear").weights)
    elif args.baselines:
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
    progress = lambda ev: bar.update(ev.done, ev.total, ev.name, ev.eta_seconds)  # noqa: E731
    if presets:
        from ..jobs.run import validate_with_presets

        result = validate_with_presets(setup, presets, genomes, progress=progress)
    else:
        result = setup.run(genomes, progress=progress)
    bar.close()
    notes = model_notes(loaded.model_id)
    if presets:
        notes = notes + ["presets: llama.cpp's type rules (llama_tensor_get_type) on the F16-rounded weights, as "
                         "llama-quantize quantises a model's F16 GGUF; the artifacts quantise the weights as loaded"]
    if args.csv:
        atomic_write_text(args.csv, render_csv(result))
    if args.json:
        print_json({"model": loaded.model_id, "model_fingerprint": loaded.fingerprint,
                    **result.to_dict(), "notes": notes})
    elif args.markdown:
        print(render_markdown(result, notes=notes), end="")
    else:
        print(render_terminal(result, notes=notes), end="")
    return 0
