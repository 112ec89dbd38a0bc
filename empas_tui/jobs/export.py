"""Export job: archetypes chosen from a study's front, optionally measured, written as artifacts.

Every choice and measurement is made before the first file is written, and the files of one export
are written all or nothing (:func:`storage.atomic.atomic_files`): a bad budget, an interruption or a
full disk leaves the output folder as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from search.archetypes import Choice, front_arrays, make_artifact, select_archetypes
from search.catalogue import load_front
from search.export_settings import ExportSettings
from search.results import FrontData
from storage.artifacts import save_artifact_bytes
from storage.atomic import atomic_files

from .models import load_checked, quantizer_for

EMBEDDED_MODEL_NOTE = ("dense = the embedded SmolLM2-135M's dequantised Q4_1 GGUF weights "
                       "(the baseline every number here is relative to; Q4_1 re-quantises them losslessly)")


@dataclass
class ExportResult:
    front: FrontData
    choices: list[Choice]
    points: list  # the front point of each choice
    artifacts: list  # storage.artifacts.Artifact, one per choice
    paths: list = field(default_factory=list)  # what was written
    skipped: dict[str, str] = field(default_factory=dict)  # archetype -> why it could not be chosen
    validation: object | None = None  # profiling.evaluation.ValidationResult
    notes: list[str] = field(default_factory=list)
    settings: ExportSettings | None = None
    format: str = "json"  # "json" or "gguf"
    study: "StudyModel | None" = None  # the loaded model, for writing the GGUF files


def model_notes(model_id: str) -> list[str]:
    return [EMBEDDED_MODEL_NOTE] if model_id == "default" else []


def spread_indices(memory, count: int, exclude=()) -> list[int]:
    """``count`` point indices spread evenly over the memory range (for proxy-vs-measured checks)."""
    m = np.asarray(memory, dtype=np.float64)
    order = [int(i) for i in np.argsort(m, kind="stable") if int(i) not in set(exclude)]
    if count <= 0 or not order:
        return []
    picks = np.unique(np.linspace(0, len(order) - 1, min(count, len(order))).round().astype(int))
    return [order[p] for p in picks]


class StudyModel:
    """The study's model, loaded once per export (only if a step needs it), with the quantiser,
    importance vectors and calibration tokens its profile was measured with."""

    def __init__(self, front: FrontData, model: str | None = None, loaded=None, load=None):
        self.front, self.model, self._loaded, self._setup = front, model, loaded, None
        self._load = load or load_checked  # (model or None, model id, fingerprint) -> checked LoadedModel

    @property
    def loaded(self):
        if self._loaded is None:
            p = self.front.profile
            self._loaded = self._load(self.model, p.model_id, p.model_fingerprint)
        return self._loaded

    @property
    def stored_settings(self) -> dict | None:
        extra = self.front.profile.extra
        return extra.get("settings") if isinstance(extra, dict) else None

    @property
    def setup(self):
        """The profile's setup rebuilt from its stored settings (None for a profile that has none)."""
        if self._setup is None and self.stored_settings:
            from profiling.sensitivity import prepare
            from profiling.settings import ProfileSettings

            settings = ProfileSettings.from_dict(self.stored_settings)
            self._setup = prepare(settings.with_(model=self.front.profile.model_id), self.loaded)
        return self._setup

    @property
    def quantizer(self):
        if self.setup is not None:
            return self.setup.quantizer
        p = self.front.profile
        return quantizer_for(p.extra, p.quantizer, p.qtypes)

    @property
    def importance(self):
        return self.setup.importance if self.setup is not None else None

    @property
    def gguf_layout(self):
        """The model's GGUF layout (the profile setup's when it is built, else made from the loaded
        model without the calibration pass a setup needs)."""
        if self._setup is not None and self._setup.memory.basis == "gguf file":
            return self._setup.memory.layout
        from profiling.deploy.gguf_writer import gguf_layout_for

        loaded = self.loaded
        return gguf_layout_for(loaded.model, loaded.tokenizer, loaded.gguf_path)


def validation_setup(settings: ExportSettings, study: StudyModel):
    """The model and held-out tokens to validate a study's genomes (disjoint from its calibration)."""
    from profiling.evaluation import prepare_validation

    profile = study.front.profile
    return prepare_validation(study.loaded, study.quantizer, settings.heldout_tokens, settings.seq_len,
                              settings.text_file, {"corpus": profile.corpus_source, "tokens": profile.calibration_tokens},
                              include_embeddings=profile.include_embeddings, importance=study.importance)


def choose(settings: ExportSettings, front: FrontData) -> tuple[list[Choice], dict[str, str]]:
    """The archetypes of ``settings`` on the study's front; the ones a budget rules out are skipped
    (with the reason) when others can still be exported."""
    memory, predicted, measured = front_arrays(front.points, front.profile.base_loss)
    skipped: dict[str, str] = {}
    choices = select_archetypes(memory, predicted, front.profile.base_loss, settings.archetypes, measured,
                                settings.max_bytes, settings.ppl_rise_cap, settings.basis,
                                skipped=skipped if len(settings.archetypes) > 1 else None)
    return choices, skipped


def refine_points(settings: ExportSettings, front: FrontData, choices: list[Choice]) -> list[int]:
    """Front points worth measuring before the choice is final: for each archetype, the ``refine``
    points nearest to it in memory (within the memory budget). The additive proxy under-predicts the
    damage of many quantised genes together, worst at low bits, where max-compression sits."""
    count = settings.refine if settings.refine is not None else (0 if front.evaluate == "measured" else 8)
    stored = front.profile.extra.get("settings") if isinstance(front.profile.extra, dict) else None
    if count <= 0 or not choices or not stored:  # a profile without its settings cannot be re-measured
        return []
    memory = np.array([p.memory_bytes for p in front.points], dtype=np.float64)
    allowed = np.ones(len(memory), dtype=bool) if settings.max_bytes is None else memory <= settings.max_bytes
    picks: list[int] = []
    for c in choices:
        order = np.argsort(np.abs(memory - c.memory_bytes), kind="stable")
        picks.extend(int(i) for i in order[allowed[order]][:count])
    return list(dict.fromkeys(picks))


def measure_on_calibration(study: StudyModel, indices: list[int], should_stop=None, progress=None) -> dict[int, float]:
    """Mean KL to dense of front points on the profile's own calibration tokens (never the held-out
    ones), every gene quantised at once: the measured objective. ``progress`` gets a
    :class:`profiling.evaluation.ValidationEvent` per point (a refinement takes a forward pass each:
    minutes on a CPU, which a client must show)."""
    import time

    from profiling.evaluation import ValidationEvent

    from .search import calibration_kl

    if study.setup is None:
        return {}
    started = time.perf_counter()

    def emit(kind: str, done: int, name: str = "") -> None:
        if progress:
            progress(ValidationEvent(kind, done, len(indices), name, elapsed=time.perf_counter() - started))

    kl = calibration_kl(study.setup)
    emit("start", 0, "refining on calibration tokens")
    out = {}
    for i in indices:
        if should_stop and should_stop():
            break
        out[i] = float(kl(study.front.points[i].qtypes))
        emit("genome", len(out), f"refining: trial {study.front.points[i].trial_number}")
    emit("done", len(out))
    return out


def gguf_files(study: StudyModel, choices: list[Choice], points: list, out_dir: Path) -> dict[Path, object]:
    """``<archetype>.gguf`` writers and ``<archetype>.tensor-types.txt`` texts for the choices."""
    from profiling.deploy.gguf_layout import tensor_types_text
    from profiling.genome import genome_from_mapping

    setup = study.setup
    if setup is None or setup.memory.basis != "gguf file":
        why = "its profile has no stored settings" if setup is None else "its model has no GGUF layout"
        raise ValueError(f"study {study.front.study_name!r} cannot be exported as GGUF ({why}): "
                         f"profile it again with --quantizer ggml")
    layout = setup.memory.layout
    profile = study.front.profile
    importance = {k: v.numpy() for k, v in (study.importance or {}).items()}
    files: dict[Path, object] = {}
    for c in choices:
        genome = genome_from_mapping(setup.inventory, dict(zip(profile.gene_names, points[c.index].qtypes)), c.archetype)
        per_weight = {w.path: q for w, q in zip(genome.weights, genome.qtypes)}
        files[out_dir / f"{c.archetype}.gguf"] = _gguf_writer(study, layout, per_weight, importance)
        files[out_dir / f"{c.archetype}.tensor-types.txt"] = tensor_types_text(layout.resolve(per_weight)).encode()
    return files


def _gguf_writer(study: StudyModel, layout, genome: dict, importance: dict):
    """A function writing the GGUF of ``genome`` to a given (temp) path."""
    from profiling.deploy.gguf_writer import write_gguf

    verify = None
    if study.loaded.gguf_path is None:  # a tokenizer written from the HF one: check it in llama.cpp
        from profiling.deploy.llamacpp import check_tokenizer

        def verify(tmp: Path) -> None:
            check_tokenizer(tmp, study.loaded.tokenizer)

    def write(path: Path) -> None:
        write_gguf(path, study.loaded.model, layout, genome, quantize=study.quantizer, importance=importance,
                   verify=verify)

    return write


def export_job(settings: ExportSettings, db, progress=None, should_stop=None, loaded=None,
               write: bool = True, load=None) -> ExportResult:
    """Choose (refined by measurement), optionally validate, then write the files of each choice.

    ``loaded`` (a model already loaded) or ``load(model, model_id, fingerprint)`` (a client's model
    cache, refusing other weights) spare a load; the model is loaded only if a step needs it."""
    result = plan_export(settings, db, progress, should_stop, loaded, load)
    if write:
        write_export(result)
    return result


def plan_export(settings: ExportSettings, db, progress=None, should_stop=None, loaded=None, load=None) -> ExportResult:
    """Every decision and measurement of an export, nothing written: a client can show the choices
    (and the validation) and write them later with :func:`write_export`, without measuring again."""
    settings.validate_settings()
    out_dir = Path(settings.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a folder: pass another -o DIR")
    front = load_front(db, settings.study)
    profile, points = front.profile, list(front.points)
    fmt = settings.format or ("gguf" if profile.quantizer.get("name") == "ggml" else "json")
    if fmt == "gguf" and profile.quantizer.get("name") != "ggml":
        raise ValueError(f"study {settings.study!r} uses the {profile.quantizer.get('name')} quantiser, which ships "
                         f"as a packed checkpoint (`empas apply`), not GGUF: pass --format json")
    study = StudyModel(front, settings.model, loaded, load)
    choices, skipped = choose(settings, front)
    to_measure = refine_points(settings, front, choices)
    if to_measure:
        measured = measure_on_calibration(study, to_measure, should_stop, progress)
        for i, kl in measured.items():
            points[i] = replace(points[i], measured={**(points[i].measured or {}), "kl": kl,
                                                     "loss": profile.base_loss + kl, "on": "calibration"})
        front = replace(front, points=points)
        choices, skipped = choose(settings, front)
    heldout_by_index: dict[int, dict] = {}
    validation = None
    if settings.validate:
        from profiling.evaluation import measured_metrics
        from profiling.genome import genome_from_mapping

        setup = validation_setup(settings, study)
        memory, predicted, _ = front_arrays(points, profile.base_loss)
        inv = setup.inventory(profile.granularity)
        chosen = list(dict.fromkeys(c.index for c in choices))
        extra = spread_indices(memory, settings.validate_points, exclude=chosen)
        names: dict[int, str] = {}
        for c in choices:
            names.setdefault(c.index, c.archetype)
        genomes = []
        for i in chosen + extra:
            p = points[i]
            label = names.get(i, "front")
            genomes.append(genome_from_mapping(
                inv, dict(zip(profile.gene_names, p.qtypes)), f"{label} (trial {p.trial_number})",
                kind="archetype" if i in names else "front", predicted_loss=float(predicted[i]),
                predicted_base_loss=profile.base_loss, source={"index": i, "trial": p.trial_number}))
        validation = setup.run(genomes, progress=progress, should_stop=should_stop)
        for i, row in zip(chosen + extra, validation.rows):
            heldout_by_index[i] = measured_metrics(row, validation)
    source = {"study": settings.study, "storage": db.redacted}
    artifacts = [make_artifact(c, points[c.index], profile, source, heldout_by_index.get(c.index)) for c in choices]
    return ExportResult(front=front, choices=choices, points=[points[c.index] for c in choices],
                        artifacts=artifacts, skipped=skipped, validation=validation,
                        notes=model_notes(profile.model_id), settings=settings, format=fmt, study=study)


def write_export(result: ExportResult, output: str | Path | None = None) -> list[Path]:
    """Write a planned export into its folder (or ``output``): all files or none."""
    out_dir = Path(output if output is not None else result.settings.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a folder: pass another -o DIR")
    choices, artifacts, points, validation = result.choices, result.artifacts, result.front.points, result.validation
    files: dict[Path, object] = {}
    if result.format == "gguf":
        files.update(gguf_files(result.study, choices, points, out_dir))
    if validation is not None:
        # Not .json: `empas evaluate DIR/*.json` must see only artifacts.
        from profiling.evaluation_report import render_csv, render_markdown

        files[out_dir / "validation.md"] = render_markdown(validation, notes=result.notes).encode()
        files[out_dir / "validation.csv"] = render_csv(validation).encode()
    jsons = [out_dir / f"{c.archetype}.json" for c in choices]
    # A failed write (a full disk, a file-size limit, no permission, a folder in the way) is one
    # storage.atomic.WriteError line, and nothing of the export is left.
    with atomic_files(list(files) + jsons) as temps:
        for path, content in files.items():
            if callable(content):
                content(temps[path])  # a GGUF, written by its writer
            else:
                temps[path].write_bytes(content)
        for c, art, path in zip(choices, artifacts, jsons):
            gguf = out_dir / f"{c.archetype}.gguf"
            if gguf in files:  # the file's own size, measured, beside the predicted memory
                art.metrics.setdefault("measured", {})["file"] = {
                    "format": "gguf", "name": gguf.name, "bytes": temps[gguf].stat().st_size}
            temps[path].write_bytes(save_artifact_bytes(art))
    result.paths = list(files) + jsons
    return result.paths
