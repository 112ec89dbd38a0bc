"""Everything a search job is told, with its defaults and validators, in one place.

The CLI builds a :class:`SearchSettings` from its flags, the TUI from its setup form, and
:func:`search.nsga.run_search` takes it as it is: a default or a check written here holds for all
three. ``None`` means "the study's stored value when resuming, else the default".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

EVALUATE_MODES = ("proxy", "measured")
PARAM_POLICIES = ("auto", "all", "front")
MAX_POPULATION = 100_000  # one generation is sampled and written in memory at once
DEFAULT_POPULATION = 50
MIB = 1024 * 1024
DEFAULT_TRIALS = {"proxy": 5000, "measured": 100}
FLAGS = {"population": "--population", "evaluate": "--evaluate", "max_mib": "--max-mib",
         "min_avg_bits": "--min-avg-bits"}


class SearchError(ValueError):
    """A user-fixable problem with a search; the message is one line naming the fix."""


@dataclass
class SearchSettings:
    """What a search run does. ``None`` means: the study's stored value when resuming, else the default.

    ``trials`` (or ``generations``) is what *this run* adds; it is rounded up to whole generations.
    ``population``, ``evaluate``, ``max_mib`` and ``min_avg_bits`` define the study and cannot change on
    resume; the others may.
    """

    study_name: str | None = None
    population: int | None = None
    trials: int | None = None
    generations: int | None = None
    crossover_prob: float | None = None
    swapping_prob: float | None = None
    mutation_prob: float | None = None  # None: Optuna's default, 1 / number of genes
    seed: int | None = None
    evaluate: str | None = None
    max_mib: float | None = None
    min_avg_bits: float | None = None
    seed_front: int | None = None  # exact-front points seeded into generation 0 (default population // 4)
    seed_from: str | None = None  # another study whose front also seeds generation 0 (measured refinement)
    params: str | None = None  # "auto" | "all" | "front": which trials store one param per gene

    DEFAULTS = {"population": DEFAULT_POPULATION, "crossover_prob": 0.9, "swapping_prob": 0.5, "seed": 0,
                "evaluate": "proxy", "params": "auto"}
    FIXED = ("population", "evaluate", "max_mib", "min_avg_bits")
    STORED = ("population", "crossover_prob", "swapping_prob", "mutation_prob", "seed", "evaluate", "max_mib",
              "min_avg_bits", "seed_front", "params")

    def validate(self) -> None:
        if self.population is not None and (not isinstance(self.population, int) or self.population < 2):
            raise SearchError(f"population {self.population} is too small: pass --population 2 or more")
        for name in ("trials", "generations"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise SearchError(f"{name} must be a positive whole number, got {v}")
        for name in ("crossover_prob", "swapping_prob", "mutation_prob"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= float(v) <= 1.0:
                raise SearchError(f"{name.replace('_', ' ')} {v} must be between 0 and 1")
        if self.evaluate is not None and self.evaluate not in EVALUATE_MODES:
            raise SearchError(f"evaluate mode {self.evaluate!r} is not one of {', '.join(EVALUATE_MODES)}")
        if self.params is not None and self.params not in PARAM_POLICIES:
            raise SearchError(f"params policy {self.params!r} is not one of {', '.join(PARAM_POLICIES)}")
        if self.population is not None and self.population > MAX_POPULATION:
            raise SearchError(f"population {self.population} is too large: pass --population {MAX_POPULATION} or less")
        for name, flag in (("max_mib", "--max-mib"), ("min_avg_bits", "--min-avg-bits")):
            v = getattr(self, name)  # inf would be stored and break JSON output; NaN compares false
            if v is not None and not math.isfinite(float(v)):
                raise SearchError(f"{flag} {v} must be a finite number")
        if self.max_mib is not None and not float(self.max_mib) > 0:
            raise SearchError(f"--max-mib {self.max_mib} must be positive")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**32):
            raise SearchError(f"seed {self.seed} must be between 0 and 4294967295")  # numpy's seed range
        if self.seed_front is not None and self.seed_front < 0:
            raise SearchError("seed_front must be >= 0")

    def resolved(self, stored: dict | None, study_name: str) -> "SearchSettings":
        """Fill ``None`` from the stored settings (resume) or the defaults; refuse changes to FIXED."""
        self.validate()
        out = SearchSettings(**{f.name: getattr(self, f.name) for f in fields(self)})
        out.study_name = study_name
        for name in self.STORED:
            mine = getattr(self, name)
            if stored is not None and name in stored:
                theirs = stored[name]
                if mine is None:
                    setattr(out, name, theirs)
                elif name in self.FIXED and mine != theirs:
                    flag = FLAGS[name]
                    was = f"without {flag}" if theirs is None else f"with {flag} {theirs}"
                    raise SearchError(f"study {study_name!r} was created {was}, not {flag} {mine}: "
                                      f"leave {flag} out to resume it, or pass a new --study")
            elif mine is None and name in self.DEFAULTS:
                setattr(out, name, self.DEFAULTS[name])
        if out.seed_front is None:
            out.seed_front = out.population // 4
        return out

    def stored(self) -> dict:
        return {name: getattr(self, name) for name in self.STORED}

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def target_trials(self, population: int) -> int:
        """Trials this run adds: ``trials``, else ``generations`` x population, else the default."""
        if self.trials is not None:
            return int(self.trials)
        if self.generations is not None:
            return int(self.generations) * population
        return DEFAULT_TRIALS[self.evaluate or "proxy"]


def constraint_values(settings: SearchSettings, memory: np.ndarray, avg_bits: np.ndarray) -> dict[str, np.ndarray]:
    """Optuna constraint values (feasible when <= 0) of each genome."""
    out = {}
    if settings.max_mib is not None:
        out["max_mib"] = np.asarray(memory) / MIB - float(settings.max_mib)
    if settings.min_avg_bits is not None:
        out["min_avg_bits"] = float(settings.min_avg_bits) - np.asarray(avg_bits)
    return out
