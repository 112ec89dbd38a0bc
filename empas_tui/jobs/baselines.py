"""Baselines to hold a study's archetypes against, measured on the held-out tokens its export
validation uses (:func:`empas_tui.jobs.export.validation_setup`: same text, same cut, same quantiser).

RTN studies: dense, uniform 8/4/3/2-bit and the llama.cpp Q4_K_M-style mix
(:mod:`profiling.baselines`). ggml studies: llama.cpp's own presets (Q8_0 ... Q2_K, Q4_0) as genomes
that follow ``llama_tensor_get_type``, shape fallbacks included (:mod:`profiling.deploy.presets`):
:func:`preset_baselines` gives each one's exact GGUF file size (the memory layout) and, where the
profile's genes can express it, its predicted loss; :func:`measure_baselines` measures them on
held-out tokens in PyTorch, quantised from F16-rounded weights as ``llama-quantize`` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from profiling.baselines import BASELINES, baseline_genomes, q4_k_m_genome
from search.export_settings import ExportSettings
from search.results import FrontData

from .export import StudyModel, validation_setup


def baseline_names(inventory) -> list[str]:
    """Every RTN baseline; the Q4_K_M-style mix only where the model has v_proj/down_proj layers."""
    names = list(BASELINES)
    try:
        q4_k_m_genome(inventory)
    except ValueError:
        names.remove("q4_k_m-mix")
    return names


def baselines_available(front: FrontData) -> str:
    """'' when the study's quantiser has baselines here, else why not (one line)."""
    name = front.profile.quantizer.get("name")
    if name in ("rtn", "ggml"):
        return ""
    return f"no baselines for the {name} quantiser"


def is_ggml(front: FrontData) -> bool:
    return front.profile.quantizer.get("name") == "ggml"


# -- llama.cpp's presets as points of a ggml study ------------------------------------------------------

@dataclass(frozen=True)
class PresetBaseline:
    """One llama.cpp preset on this model: its exact GGUF file size and, where the profile's genes can
    express it, its predicted loss (``predicted_loss`` None: ``why_not`` says why)."""

    name: str
    file_bytes: int  # exact: the memory layout of the GGUF file llama-quantize writes
    average_bits: float  # over the matrices, parameter-weighted
    predicted_loss: float | None
    why_not: str = ""
    gene_qtypes: tuple[str, ...] = ()  # the preset as a genome of the profile's genes ('' where mixed)
    types: dict = field(default_factory=dict)  # GGUF tensor name -> type

    def predicted_kl(self, base_loss: float) -> float | None:
        return None if self.predicted_loss is None else self.predicted_loss - base_loss

    @property
    def file_mb(self) -> float:
        return self.file_bytes / 1e6


def preset_baselines(profile, layout, inventory, presets=()) -> list[PresetBaseline]:
    """llama.cpp's presets for a ggml profile (pure: a profile, the model's GGUF layout and the
    inventory of the profile's genes). A preset is predicted by the additive proxy only where every
    gene holds one type the profile measured and every tensor outside the genes stays as the memory
    model keeps it (F16): e.g. Q4_K_M raises ``attn_v``/``ffn_down`` inside a block, which no block
    gene can express."""
    from profiling.deploy.presets import PRESETS, preset_genome
    from profiling.quantizers.ggml_types import ggml_type

    if list(inventory.gene_names()) != list(profile.gene_names):
        raise ValueError("the model's genes are not the profile's: was the study made with another model?")
    gene_tensors = {layout.tensor(w.path).name for g in inventory.genes for w in g.weights}
    qtype_col = {q: j for j, q in enumerate(profile.qtypes)}
    out = []
    for name in presets or PRESETS:
        types = preset_genome(name, layout)
        params = [(t.rows * t.in_features, ggml_type(types[t.name]).bits_per_weight) for t in layout.matrices]
        bits = sum(n * b for n, b in params) / max(1, sum(n for n, _ in params))
        why, per_gene = "", []
        for i, gene in enumerate(inventory.genes):
            held = sorted({types[layout.tensor(w.path).name] for w in gene.weights})
            if len(held) > 1:
                why = why or f"it mixes {'/'.join(held)} inside gene {gene.name} (profile per linear to predict it)"
                per_gene.append("")
            elif held[0] not in qtype_col or not profile.valid[i, qtype_col[held[0]]]:
                why = why or f"the profile has no {held[0]} for gene {gene.name}"
                per_gene.append("")
            else:
                per_gene.append(held[0])
        outside = [t.name for t in layout.matrices if t.name not in gene_tensors and types[t.name] != "f16"]
        if outside and not why:
            why = f"it quantises {outside[0]}, which is no gene of the profile"
        predicted = None if why else profile.predicted_loss(per_gene)
        out.append(PresetBaseline(name=name, file_bytes=layout.file_bytes(types), average_bits=bits,
                                  predicted_loss=predicted, why_not=why, gene_qtypes=tuple(per_gene), types=types))
    return out


def nearest_presets(memory_bytes: int, presets: list[PresetBaseline], count: int = 2) -> list[PresetBaseline]:
    """The ``count`` presets closest in file size, smaller first."""
    ranked = sorted(presets, key=lambda p: (abs(p.file_bytes - memory_bytes), p.file_bytes))[:count]
    return sorted(ranked, key=lambda p: p.file_bytes)


def profile_presets(profile, loaded, layout=None) -> list[PresetBaseline]:
    """:func:`preset_baselines` of a ggml profile on its loaded model (``layout``: its GGUF layout when
    the caller has it; else made from the model)."""
    from profiling.inventory import build_inventory

    if layout is None:
        from profiling.deploy.gguf_writer import gguf_layout_for

        layout = gguf_layout_for(loaded.model, loaded.tokenizer, loaded.gguf_path)
    inventory = build_inventory(loaded.model, profile.granularity, profile.include_embeddings)
    return preset_baselines(profile, layout, inventory)


def ggml_presets(front: FrontData, study: StudyModel) -> list[PresetBaseline]:
    """:func:`profile_presets` for a study (loads its model through ``study`` if needed)."""
    return profile_presets(front.profile, study.loaded, study.gguf_layout)


def preset_kl_text(preset: PresetBaseline, base_loss: float) -> str:
    kl = preset.predicted_kl(base_loss)
    return "n/a" if kl is None or not math.isfinite(kl) else f"{kl:.3f}"


# -- measuring ---------------------------------------------------------------------------------------------

def measure_baselines(settings: ExportSettings, front: FrontData, loaded=None, progress=None, should_stop=None,
                      load=None):
    """The baselines' ``ValidationResult`` on the export's held-out tokens (None where
    :func:`baselines_available` says why not). ggml: "dense" (F16) and llama.cpp's presets, fake-quantised
    with the ggml quantiser from F16-rounded weights and no importance matrix, as llama-quantize writes them."""
    if baselines_available(front):
        return None
    study = StudyModel(front, settings.model, loaded, load)
    setup = validation_setup(settings, study)
    inventory = setup.inventory("linear")
    if not is_ggml(front):
        return setup.run(baseline_genomes(inventory, baseline_names(inventory)), progress=progress,
                         should_stop=should_stop)
    from profiling.quantizers import make_quantizer
    from profiling.settings import QuantizerSettings, parse_ggml_types

    from .run import PRESET_QTYPES, F16SourceQuantizer, preset_genomes

    qtypes = parse_ggml_types(sorted(set(PRESET_QTYPES) | set(front.profile.qtypes)))
    quantizer = make_quantizer(QuantizerSettings(name="ggml", qtypes=qtypes, imatrix=None))
    preset_setup = replace(setup, quantizer=F16SourceQuantizer(quantizer), importance=None)
    return preset_setup.run(preset_genomes(study.loaded.model, inventory.weights), progress=progress,
                            should_stop=should_stop)
