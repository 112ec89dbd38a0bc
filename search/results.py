"""What a search produces: front points, progress events, run results and a study's stored front."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from profiling.profile import Profile

from .space import MIB, SearchSpace


@dataclass
class FrontPoint:
    """One point of a front: a trial's genome (one qtype per gene) and its objectives."""

    trial_number: int
    qtypes: list[str]
    predicted_loss: float
    memory_bytes: int
    measured: dict | None = None  # measured mode: {"loss": ..., "kl": ...}
    average_bits: float | None = None
    feasible: bool = True

    @property
    def memory_mib(self) -> float:
        return self.memory_bytes / MIB

    @property
    def loss(self) -> float:
        """The objective the study minimised: measured loss in measured mode, else predicted."""
        return self.measured["loss"] if self.measured else self.predicted_loss

    def to_dict(self, gene_names: list[str] | None = None) -> dict:
        d = {"trial": self.trial_number, "memory_bytes": int(self.memory_bytes),
             "memory_mib": self.memory_mib, "predicted_loss": self.predicted_loss,
             "predicted_ppl": math.exp(min(self.predicted_loss, 700.0)), "average_bits": self.average_bits,
             "measured": self.measured, "feasible": self.feasible}
        d["qtypes"] = dict(zip(gene_names, self.qtypes)) if gene_names else list(self.qtypes)
        return d


@dataclass
class SearchEvent:
    """Progress of a search, once per generation (and once per trial in measured mode).

    ``kind``: "start", "generation", "trial" (measured mode), "done" or "stopped". ``front`` is the
    study's current feasible Pareto front; ``hypervolume_ratio`` compares it to the exact front of the
    proxy (proxy mode only; None in measured mode).
    """

    kind: str
    study_name: str
    generation: int
    trials_done: int  # in this run
    trials_target: int  # this run's total
    trials_total: int  # complete trials in the study
    elapsed: float
    trials_per_s: float
    front: list[FrontPoint]
    hypervolume_ratio: float | None


@dataclass
class SearchResult:
    study_name: str
    storage: str  # redacted URL
    evaluate: str
    trials_run: int
    trials_total: int
    first_generation: int
    last_generation: int
    seconds: float
    trials_per_s: float
    front: list[FrontPoint]
    hypervolume_ratio: float | None
    exact_front_points: int
    resumed: bool
    stopped: bool
    params_trials: int  # trials of this run written with one param per gene
    settings: dict = field(default_factory=dict)
    gene_names: list[str] = field(default_factory=list)

    def to_dict(self, with_bits: bool = True) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("front", "gene_names")}
        d["front"] = [p.to_dict(self.gene_names if with_bits else None) for p in self.front]
        if not with_bits:
            for p in d["front"]:
                p.pop("qtypes")
        return d


@dataclass
class FrontData:
    study_name: str
    profile: Profile
    space: SearchSpace
    settings: dict
    points: list[FrontPoint]
    trials_complete: int
    evaluate: str
    hypervolume_ratio: float | None = None


