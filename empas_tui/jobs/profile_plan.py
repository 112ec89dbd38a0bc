"""A profile job in two steps, so a client can show the work before it is done.

:func:`plan_profile` loads the model, cuts the tokens and reads what the storage already holds: the
genes, the qtypes each can take and the cells measured earlier. :func:`measure_plan` measures the
rest. Together they are :func:`empas_tui.jobs.profile.ensure_profile` (same metric rule, same
persistence), with the plan in between: the TUI draws its table from it, a CLI could print
"N cells to measure, M reused" before the first measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from profiling.models import LoadedModel
from profiling.sensitivity import ProfileSetup, prepare, run_profile
from profiling.settings import ProfileSettings

from .profile import ProfileJob, resolve_metric


@dataclass
class ProfilePlan:
    setup: ProfileSetup
    gene_names: list[str]
    gene_params: list[int]
    qtypes: list[str]
    unquantized: str
    valid: np.ndarray  # (genes, qtypes) bool: which qtypes each gene can take
    known: dict[tuple[int, str], float]  # (gene index, qtype) -> value already stored
    note: str = ""  # e.g. "using the stored fisher profile"

    @property
    def total(self) -> int:
        """Cells of the whole profile (measured or stored)."""
        return int(self.valid.sum())


def plan_profile(settings: ProfileSettings, db, loaded: LoadedModel | None = None) -> ProfilePlan:
    """Validate, load, tokenise and read the stored cells of the profile ``settings`` describe."""
    setup = prepare(settings, loaded)
    setup, note = resolve_metric(settings, db, setup)
    qtypes = list(setup.quantizer.qtypes)
    genes = setup.inventory.genes
    known = {}
    if db.profiles.header(setup.key) is not None:
        known = {k: v for k, v in db.profiles.entries(setup.key).items() if k[1] in qtypes and k[0] < len(genes)}
    return ProfilePlan(setup=setup, gene_names=setup.inventory.gene_names(), gene_params=[g.params for g in genes],
                       qtypes=qtypes, unquantized=setup.quantizer.unquantized,
                       valid=setup.inventory.valid_table(setup.quantizer, qtypes), known=known, note=note)


def measure_plan(plan: ProfilePlan, db, progress=None, should_stop=None, reuse_prefix: bool = True,
                 claim_ttl: float | None = None) -> ProfileJob:
    """Measure the cells the plan lacks (each finished gene is persisted at once; genes other workers
    claim on the same storage are theirs, their cells arrive as "remote" events) and return the job."""
    profile = run_profile(plan.setup, db.profiles, progress=progress, should_stop=should_stop,
                          reuse_prefix=reuse_prefix, claim_ttl=claim_ttl)
    return ProfileJob(setup=plan.setup, profile=profile, note=plan.note)
