"""Search job: profile first when needed, then create or resume the NSGA-II study."""

from __future__ import annotations

from dataclasses import dataclass

from profiling.settings import ProfileSettings
from search.catalogue import study_info
from search.nsga import run_search
from search.results import SearchResult
from search.settings import SearchError, SearchSettings

from .profile import ProfileJob, ensure_profile


@dataclass
class SearchJob:
    result: SearchResult
    profile_job: ProfileJob | None  # None when the study's stored profile was used as it is
    note: str = ""


def stored_study_profile(db, name: str | None, profile_settings: ProfileSettings | None, evaluate: str | None,
                         explicit: set[str]):
    """The profile stored in study ``name`` when it exists and nothing asks for the model, else None.

    ``explicit`` names the profile options the user gave; one that contradicts the study is refused
    in one line (a resume continues on the study's own profile)."""
    if not name:
        return None
    info = study_info(db, name)
    if info is None:
        return None
    profile = info["profile"]
    if "granularity" in explicit and profile_settings.granularity != profile.granularity:
        raise SearchError(f"study {name!r} searches {profile.granularity} genes, not {profile_settings.granularity}: "
                          f"leave --granularity out or pass another --study")
    if "qtypes" in explicit and list(profile_settings.quantizer.qtypes) != list(profile.qtypes):
        raise SearchError(f"study {name!r} uses {','.join(profile.qtypes)}, not "
                          f"{','.join(profile_settings.quantizer.qtypes)}: leave --bits/--types out or pass another --study")
    needs_model = (evaluate or info["evaluate"]) == "measured"
    explicit_model = bool(explicit & {"model", "text"})
    return None if (explicit_model or needs_model) else profile


def run_search_job(profile_settings: ProfileSettings, search_settings: SearchSettings, db,
                   explicit: set[str] = frozenset(), profile_progress=None, search_progress=None,
                   should_stop=None, loaded=None, profile_job: ProfileJob | None = None) -> SearchJob:
    """Search on the stored study's profile (resume), on ``profile_job`` (a profile the client just
    measured), or on a fresh/stored profile of the model."""
    search_settings.validate()
    name = search_settings.study_name
    info = study_info(db, name) if name else None
    if info is not None:  # a contradicting --population / --evaluate / ...: refused before any model is loaded
        search_settings.resolved(info["settings"], name)
    profile = stored_study_profile(db, search_settings.study_name, profile_settings, search_settings.evaluate,
                                   set(explicit))
    job = None
    measure = None
    if profile is None:
        job = profile_job or ensure_profile(profile_settings, db, progress=profile_progress, should_stop=should_stop,
                                            loaded=loaded)
        profile = job.profile
        measured = (search_settings.evaluate or (info or {}).get("evaluate")) == "measured"
        if measured:
            measure = calibration_kl(job.setup)
    result = run_search(search_settings, profile, db, progress=search_progress, should_stop=should_stop,
                        measure=measure)
    return SearchJob(result=result, profile_job=job, note=job.note if job else "")


def calibration_kl(setup):
    """The measured objective: mean KL to dense on the calibration tokens, every gene quantised.

    The genomes measured share most of their genes: each (weight, qtype) is quantised once."""
    from profiling.quantizers.memo import MemoQuantizer
    from profiling.streaming import make_runner

    runner = make_runner(setup.loaded.model, setup.inventory, setup.tokens.calibration, importance=setup.importance)
    genes = setup.inventory.genes
    quantizer = MemoQuantizer(setup.quantizer)
    return lambda qtypes: runner.kl_with(genes, list(qtypes), quantizer)
