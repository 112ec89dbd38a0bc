"""Profile job: the sensitivity profile a search needs, measured or taken from the storage."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from profiling.profile import Profile
from profiling.settings import METRICS, ProfileSettings

if TYPE_CHECKING:  # the model side (torch) is imported when a profile is needed, not by `empas search --study`
    from profiling.models import LoadedModel
    from profiling.sensitivity import ProfileSetup


@dataclass
class ProfileJob:
    """What :func:`ensure_profile` returns: the setup (model, tokens, quantiser) and the profile."""

    setup: ProfileSetup
    profile: Profile
    note: str = ""  # e.g. "using the stored fisher profile" (shown by both clients)


def resolve_metric(settings: ProfileSettings, db, setup: ProfileSetup) -> tuple[ProfileSetup, str]:
    """``metric=None`` means: the default (KL), unless only a profile with another metric is stored
    complete for this model, corpus, quantiser and granularity, in which case that one is used and
    named (a user who ran ``empas profile --metric fisher`` then ``empas search`` gets their profile,
    not a 35-minute KL measurement they did not ask for)."""
    from profiling.sensitivity import load_profile

    if settings.metric is not None:
        return setup, ""
    default = replace(setup, settings=replace(settings, metric=METRICS[0]))
    if load_profile(default, db.profiles) is not None:
        return default, ""
    for metric in METRICS[1:]:
        other = replace(setup, settings=replace(settings, metric=metric))
        if load_profile(other, db.profiles) is not None:
            return other, (f"using the stored {metric} profile of this model; pass --metric {METRICS[0]} to "
                           f"measure the {METRICS[0]} one")
    return default, ""


def ensure_profile(settings: ProfileSettings, db, progress=None, should_stop=None,
                   loaded: LoadedModel | None = None, reuse_prefix: bool = True,
                   claim_ttl: float | None = None) -> ProfileJob:
    """Load the model and measure every missing (gene, qtype) cell of the profile (reusing the stored
    ones); finished genes are persisted as they complete, so an interrupted job resumes, and other
    processes running the same job on the same storage take the genes this one has not claimed
    (docs/workers.md).

    ``should_stop``: a callable or a ``threading.Event`` (what the clients hold), like the search's.
    ``claim_ttl``: seconds before a dead worker's gene is taken over (default: ``$EMPAS_CLAIM_TTL`` or 180)."""
    from profiling.sensitivity import prepare, run_profile

    setup = prepare(settings, loaded)
    setup, note = resolve_metric(settings, db, setup)
    stop = should_stop.is_set if hasattr(should_stop, "is_set") else should_stop
    profile = run_profile(setup, db.profiles, progress=progress, should_stop=stop, reuse_prefix=reuse_prefix,
                          claim_ttl=claim_ttl)
    return ProfileJob(setup=setup, profile=profile, note=note)
