"""Baselines to hold a study's archetypes against, measured on the held-out tokens its export
validation uses (:func:`empas_tui.jobs.export.validation_setup`: same text, same cut, same quantiser).

RTN studies: dense, uniform 8/4/3/2-bit and the llama.cpp Q4_K_M-style mix
(:mod:`profiling.baselines`). ggml studies: llama.cpp's own presets, which come with the GGUF
export; until then there are none and :func:`measure_baselines` says so.
"""

from __future__ import annotations

from profiling.baselines import BASELINES, baseline_genomes, q4_k_m_genome
from search.export_settings import ExportSettings
from search.results import FrontData

from .export import StudyModel, validation_setup

GGML_PENDING = "ggml baselines are llama.cpp's presets (Q4_K_M, ...), measured with the GGUF export: not yet"


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
    return "" if front.profile.quantizer.get("name") == "rtn" else GGML_PENDING


def measure_baselines(settings: ExportSettings, front: FrontData, loaded=None, progress=None, should_stop=None,
                      load=None):
    """The baselines' ``ValidationResult`` (None where :func:`baselines_available` says why not)."""
    if baselines_available(front):
        return None
    setup = validation_setup(settings, StudyModel(front, settings.model, loaded, load))
    inventory = setup.inventory("linear")
    return setup.run(baseline_genomes(inventory, baseline_names(inventory)), progress=progress,
                     should_stop=should_stop)
