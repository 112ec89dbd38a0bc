"""The persistent NSGA-II search: an Optuna study per (model, genome, bits), resumable, fast.

How a run works, and why:

- **Sampling is Optuna's NSGAIISampler**, driven generation by generation: each child is drawn with the
  sampler's own ``sample_relative`` (parent selection, uniform crossover, mutation) and
  ``sample_independent`` (generation 0 and mutated genes) on a small in-memory *window* study that holds
  the last generation and its parents. Going through ``study.ask`` + 210 ``suggest_categorical`` costs
  ~30 ms a trial in Optuna's bookkeeping alone (bench/bench_search.py); calling the sampler directly
  costs ~3 ms.
- **Evaluation is vectorised** over the whole generation (the proxy objectives are table look-ups), or
  one trial at a time in ``measured`` mode (real KL with every gene fake-quantised).
- **Persistence is one transaction per generation** (:mod:`storage.studies`): the trials go into
  Optuna's RDB schema as COMPLETE trials with ``NSGAIISampler:generation`` and the parent cache, so
  ``optuna.load_study`` reads them, a resumed run continues the generation count, and a stop never
  leaves a RUNNING trial. Every trial carries its genome as the compact user attribute ``bits``; trials
  that are on the (feasible) Pareto front when written also get one categorical param per gene (at
  ``block`` granularity, and under ``params="all"``, every trial does). A trial that is dominated when
  written stays dominated, so the front is always there as params.
- **Constraints** use Optuna 5's mechanism (``constraints:<name>`` trial system attributes, what
  ``Trial.set_constraint`` writes): NSGA-II applies constrained domination and ``study.best_trials``
  ignores infeasible trials, which are kept.
- **Seeds**: generation 0 starts with the uniform genomes and points spread along the exact front of
  the proxy; they carry the generation attribute, so NSGA-II selects from them.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from typing import Callable

import numpy as np

from profiling.profile import Profile
from storage import studies as st
from storage.urls import redact, resolve_storage_url

from .exact_front import ExactFront, front_for_space
from .hypervolume import FrontScale
from .space import MIB, SearchSpace

SCHEMA = 1
EVALUATE_MODES = ("proxy", "measured")
PARAM_POLICIES = ("auto", "all", "front")
AUTO_ALL_PARAMS_MAX_GENES = 64  # "auto": every trial as params up to this many genes (block: 30)
MAX_POPULATION = 100_000  # one generation is sampled and written in memory at once
WINDOW_GENERATIONS = 8  # the in-memory window is rebuilt once it holds this many populations
ATTR = "empas:"


class SearchError(ValueError):
    """A user-fixable problem with a search; the message is one line naming the fix."""


# -- settings ------------------------------------------------------------------------------------

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

    DEFAULTS = {"population": 50, "crossover_prob": 0.9, "swapping_prob": 0.5, "seed": 0, "evaluate": "proxy",
                "params": "auto"}
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
                    flag = {"population": "--population", "evaluate": "--evaluate", "max_mib": "--max-mib",
                            "min_avg_bits": "--min-avg-bits"}[name]
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


# -- results and events ----------------------------------------------------------------------------

@dataclass
class FrontPoint:
    trial_number: int
    bits: list[int]
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
        d["bits"] = dict(zip(gene_names, self.bits)) if gene_names else list(self.bits)
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
                p.pop("bits")
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


# -- helpers -------------------------------------------------------------------------------------

def default_study_name(profile: Profile, evaluate: str = "proxy") -> str:
    model = re.sub(r"[^A-Za-z0-9._-]+", "-", profile.model_id.rstrip("/").rsplit("/", 1)[-1]) or "model"
    name = f"{model}-{profile.granularity}-{'.'.join(map(str, profile.bits))}"
    if profile.metric != "kl":
        name += f"-{profile.metric}"
    if evaluate == "measured":
        name += "-measured"
    return name


def _weak_front_mask(loss: np.ndarray, memory: np.ndarray) -> np.ndarray:
    """True for points no other point strictly dominates (identical points all kept)."""
    if len(loss) == 0:
        return np.zeros(0, dtype=bool)
    pts = np.column_stack([np.asarray(memory, dtype=np.float64), np.asarray(loss, dtype=np.float64)])
    uniq, inverse = np.unique(pts, axis=0, return_inverse=True)  # sorted by memory, then loss
    best_before = np.minimum.accumulate(np.concatenate([[np.inf], uniq[:-1, 1]]))
    keep = uniq[:, 1] < best_before
    return keep[np.asarray(inverse).reshape(-1)]


def _constraint_values(settings: SearchSettings, memory: np.ndarray, avg_bits: np.ndarray) -> dict[str, np.ndarray]:
    out = {}
    if settings.max_mib is not None:
        out["max_mib"] = memory / MIB - float(settings.max_mib)
    if settings.min_avg_bits is not None:
        out["min_avg_bits"] = float(settings.min_avg_bits) - avg_bits
    return out


def _stop_requested(should_stop) -> bool:
    if should_stop is None:
        return False
    if hasattr(should_stop, "is_set"):
        return bool(should_stop.is_set())
    return bool(should_stop())


def _quiet_optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _study_id(storage, name: str) -> int | None:
    try:
        return storage.get_study_id_from_name(name)
    except KeyError:
        return None


def _stored_profile(attrs: dict, name: str) -> Profile:
    data = st.get_study_json(attrs, ATTR + "profile")
    if data is None:
        raise SearchError(f"study {name!r} has no stored EMPAS profile (not an EMPAS study, or damaged): "
                          f"pass another --study")
    try:
        return Profile.from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise SearchError(f"study {name!r} has a damaged EMPAS profile ({type(exc).__name__}): "
                          f"pass another --study") from None


def _stored_settings(attrs: dict, name: str) -> dict:
    settings = attrs.get(ATTR + "settings") or {}
    if not isinstance(settings, dict):
        raise SearchError(f"study {name!r} has damaged EMPAS settings: pass another --study")
    return dict(settings)


def _check_compatible(name: str, stored: Profile, profile: Profile) -> None:
    if stored.model_fingerprint != profile.model_fingerprint:
        raise SearchError(f"study {name!r} belongs to model {stored.model_id} (fingerprint "
                          f"{stored.model_fingerprint[:12]}), not {profile.model_id} ({profile.model_fingerprint[:12]}): "
                          f"pass another --study or that model")
    if stored.gene_names != profile.gene_names:
        raise SearchError(f"study {name!r} searches {stored.n_genes} {stored.granularity} genes, this profile has "
                          f"{profile.n_genes} {profile.granularity} genes: pass --granularity {stored.granularity} "
                          f"or another --study")
    if list(stored.bits) != list(profile.bits):
        raise SearchError(f"study {name!r} uses bits {','.join(map(str, stored.bits))}, not "
                          f"{','.join(map(str, profile.bits))}: pass --bits {','.join(map(str, stored.bits))} "
                          f"or another --study")
    if stored.quantizer != profile.quantizer:
        raise SearchError(f"study {name!r} used quantiser {stored.quantizer}, not {profile.quantizer}: "
                          f"pass the same --group-size or another --study")
    if stored.key != profile.key:
        raise SearchError(f"study {name!r} was built from another profile (metric {stored.metric}, "
                          f"{stored.calibration_tokens} calibration tokens of {stored.corpus_source}): "
                          f"pass the same profiling options or another --study")


class _Genomes:
    """Converts between genome strings ("4,8,2,...") and bit-width index arrays."""

    def __init__(self, space: SearchSpace):
        self.space = space
        self.bits = np.asarray(space.bits, dtype=np.int64)
        self.lookup = {b: j for j, b in enumerate(space.bits)}

    def parse(self, text: str) -> np.ndarray | None:
        try:
            idx = np.array([self.lookup[int(b)] for b in text.split(",")], dtype=np.int8)
        except (KeyError, ValueError):
            return None
        return idx if len(idx) == self.space.n_genes else None

    def text(self, idx: np.ndarray) -> str:
        return ",".join(map(str, self.bits[np.asarray(idx, dtype=np.int64)].tolist()))


# -- the run -------------------------------------------------------------------------------------

class _Archive:
    """Every complete trial of the study (objectives, feasibility, genome) and its feasible front."""

    def __init__(self, n_genes: int):
        self.loss: list[float] = []
        self.memory: list[float] = []
        self.feasible: list[bool] = []
        self.number: list[int] = []
        self.genomes: list[np.ndarray] = []
        self.extra: list[dict | None] = []
        self.front = np.zeros(0, dtype=np.int64)
        self._seen = 0

    def __len__(self) -> int:
        return len(self.loss)

    def add(self, loss, memory, feasible, numbers, genomes, extra=None) -> None:
        self.loss.extend(map(float, loss))
        self.memory.extend(map(float, memory))
        self.feasible.extend(map(bool, feasible))
        self.number.extend(map(int, numbers))
        self.genomes.extend(genomes)
        self.extra.extend(extra if extra is not None else [None] * len(loss))

    def candidate_front(self, loss: np.ndarray, memory: np.ndarray, feasible: np.ndarray) -> np.ndarray:
        """Which of a new batch would be on the front (weakly) if added now."""
        fl = np.asarray(self.loss)[self.front] if len(self.front) else np.zeros(0)
        fm = np.asarray(self.memory)[self.front] if len(self.front) else np.zeros(0)
        all_loss = np.concatenate([fl, np.where(feasible, loss, np.inf)])
        all_mem = np.concatenate([fm, np.where(feasible, memory, np.inf)])
        mask = _weak_front_mask(all_loss, all_mem)[len(fl):]
        return mask & feasible

    def refresh_front(self) -> None:
        """Fold the trials added since the last call into the front (sorted by memory)."""
        loss = np.asarray(self.loss)
        memory = np.asarray(self.memory)
        feasible = np.asarray(self.feasible, dtype=bool)
        new = np.arange(self._seen, len(loss))
        cand = np.concatenate([self.front, new[feasible[new]]]).astype(np.int64)
        if len(cand):
            cand = cand[_weak_front_mask(loss[cand], memory[cand])]
            cand = cand[np.lexsort((loss[cand], memory[cand]))]
        self.front = cand
        self._seen = len(loss)


_WINDOW_TRIAL = None


def _window_trial_class():
    """A FrozenTrial whose copies share nothing mutable but copy only shallowly. Optuna's in-memory
    storage deep-copies every trial it is given (a third of the run time at 210 genes); the window's
    trials are never modified after creation, so a copy of the dicts is enough."""
    global _WINDOW_TRIAL
    if _WINDOW_TRIAL is None:
        import copy

        from optuna.trial import FrozenTrial

        class WindowTrial(FrozenTrial):
            def __deepcopy__(self, memo):
                new = copy.copy(self)
                new._params = dict(self._params)
                new._user_attrs = dict(self._user_attrs)
                new._system_attrs = dict(self._system_attrs)
                new._values = None if self._values is None else list(self._values)
                new.intermediate_values = dict(self.intermediate_values)
                return new

        _WINDOW_TRIAL = WindowTrial
    return _WINDOW_TRIAL


class _Run:
    def __init__(self, settings: SearchSettings, profile: Profile, storage, study_id: int, url: str,
                 runner=None, progress=None, should_stop=None, resumed: bool = False):
        self.optuna = _quiet_optuna()
        from optuna.distributions import CategoricalDistribution, distribution_to_json
        from optuna.samplers import NSGAIISampler

        self.settings, self.profile, self.storage, self.study_id, self.url = settings, profile, storage, study_id, url
        self.progress, self.should_stop, self.runner, self.resumed = progress, should_stop, runner, resumed
        self.space = SearchSpace.from_profile(profile)
        self.codec = _Genomes(self.space)
        self.names = list(self.space.gene_names)
        self.dist = CategoricalDistribution(list(self.space.bits))
        self.dist_json = distribution_to_json(self.dist)
        self.dists = {n: self.dist for n in self.names}
        self.gen_key = getattr(NSGAIISampler, "_GENERATION_KEY", st.GENERATION_KEY)
        self.parent_prefix = getattr(NSGAIISampler, "_PARENT_CACHE_KEY_PREFIX", st.PARENT_KEY_PREFIX)
        self.P = int(settings.population)
        self.measured = settings.evaluate == "measured"
        policy = settings.params
        if policy == "auto":
            policy = "all" if self.space.n_genes <= AUTO_ALL_PARAMS_MAX_GENES else "front"
        self.policy = policy
        self.archive = _Archive(self.space.n_genes)
        self.exact = self._exact_front()
        self.scale = FrontScale(self.exact.loss, self.exact.memory)
        self.exact_hv = self.scale.hypervolume(self.exact.loss, self.exact.memory)
        self.NSGAIISampler = NSGAIISampler
        if self.measured:
            self._prepare_measured()

    # -- reference front and constraints ----------------------------------------------------------
    def _exact_front(self) -> ExactFront:
        front = front_for_space(self.space)
        avg = (np.asarray(self.space.bits, dtype=np.float64)[front.genomes] * self.space.gene_params).sum(axis=1) \
            / self.space.gene_params.sum()
        cons = _constraint_values(self.settings, front.memory.astype(np.float64), avg)
        ok = np.ones(len(front), dtype=bool)
        for v in cons.values():
            ok &= v <= 0
        if not ok.any():
            smallest = front.memory.min() / MIB
            raise SearchError(f"no genome meets the constraints (the smallest model is {smallest:.1f} MiB at "
                              f"{min(self.space.bits)} bits): raise --max-mib or lower --min-avg-bits")
        return ExactFront(memory=front.memory[ok], loss=front.loss[ok], genomes=front.genomes[ok])

    def _prepare_measured(self) -> None:
        if self.runner is None:
            raise SearchError("measured evaluation needs the model: run `empas search --evaluate measured` "
                              "with the model options (the engine needs a PrefixRunner)")
        genes = self.runner.inventory.genes
        if [g.name for g in genes] != self.names:
            raise SearchError("the loaded model's genes do not match the study's: pass the study's --model "
                              "and --granularity")
        from profiling.quantizer import make_quantizer

        self.quantizer = make_quantizer(self.profile.quantizer.get("name", "rtn"),
                                        int(self.profile.quantizer.get("group_size", 64)))
        self.genes = genes
        self.kl_cache: dict[bytes, float] = {}

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate_proxy(self, idx: np.ndarray):
        idx = np.asarray(idx, dtype=np.int64)
        loss = self.space.predicted_loss(idx)
        memory = self.space.memory_bytes(idx).astype(np.float64)
        return np.atleast_1d(loss), np.atleast_1d(memory)

    def measure(self, idx: np.ndarray) -> float:
        key = np.asarray(idx, dtype=np.int8).tobytes()
        if key not in self.kl_cache:
            bits = self.space.bits_of(idx)
            self.kl_cache[key] = float(self.runner.kl_with(self.genes, bits, self.quantizer))
        return self.kl_cache[key]

    def average_bits(self, idx: np.ndarray) -> np.ndarray:
        b = np.asarray(self.space.bits, dtype=np.float64)[np.asarray(idx, dtype=np.int64)]
        return (b * self.space.gene_params).sum(axis=-1) / self.space.gene_params.sum()

    # -- the in-memory window study the sampler works on ------------------------------------------
    def _new_window(self, seed_offset: int):
        seed = self.settings.seed
        sampler = self.NSGAIISampler(
            population_size=self.P, crossover_prob=float(self.settings.crossover_prob),
            swapping_prob=float(self.settings.swapping_prob), mutation_prob=self.settings.mutation_prob,
            seed=None if seed is None else (int(seed) + seed_offset) % 2**32)
        self.sampler = sampler
        self._reset_window_study()

    def _reset_window_study(self):
        self.window = self.optuna.create_study(directions=["minimize", "minimize"], sampler=self.sampler)
        self.mem_to_rdb: dict[int, int] = {}
        self.rdb_to_mem: dict[int, int] = {}
        self.window_trials = 0

    def _frozen(self, idx, values, generation, constraints: dict[str, float]):
        from optuna.trial import TrialState

        now = datetime.now()
        bits = self.codec.bits[np.asarray(idx, dtype=np.int64)].tolist()
        system_attrs = {self.gen_key: int(generation)}
        system_attrs.update({st.CONSTRAINT_PREFIX + k: float(v) for k, v in constraints.items()})
        return _window_trial_class()(number=0, state=TrialState.COMPLETE, value=None, values=[float(v) for v in values],
                           datetime_start=now, datetime_complete=now, params=dict(zip(self.names, bits)),
                           distributions=self.dists, user_attrs={}, system_attrs=system_attrs,
                           intermediate_values={}, trial_id=-1)

    def _window_add(self, frozen_trials: list, rdb_ids: list[int]) -> None:
        # Straight into the in-memory storage: these trials are valid by construction (Study.add_trial
        # would validate every param again) and cheap to copy (see _window_trial_class).
        storage, study_id = self.window._storage, self.window._study_id
        for ft, rid in zip(frozen_trials, rdb_ids):
            mem_id = storage.create_new_trial(study_id, template_trial=ft)
            self.mem_to_rdb[mem_id] = rid
            self.rdb_to_mem[rid] = mem_id
        self.window_trials += len(frozen_trials)

    def _set_window_parents(self, generation: int, rdb_ids: list[int]) -> None:
        self.window._storage.set_study_system_attr(
            self.window._study_id, self.parent_prefix + str(generation), [self.rdb_to_mem[r] for r in rdb_ids])

    def _maybe_shrink_window(self, generation: int) -> None:
        """Keep only the last generation and its parents (what the next one is bred from)."""
        if self.window_trials <= WINDOW_GENERATIONS * self.P or generation < 1:
            return
        parents = self.sampler.get_parent_population(self.window, generation)
        population = self.sampler.get_population(self.window, generation)
        keep = [(t, self.mem_to_rdb[t._trial_id]) for t in parents + population]
        parent_rdb = [self.mem_to_rdb[t._trial_id] for t in parents]
        self._reset_window_study()
        self._window_add([t for t, _ in keep], [r for _, r in keep])
        self._set_window_parents(generation, parent_rdb)

    # -- resume ------------------------------------------------------------------------------------
    def load_existing(self) -> tuple[int, int]:
        """Read the study's trials into the archive and the window; return (next generation, children
        still missing in it)."""
        table = st.read_trials(self.storage, self.study_id, with_params_for_missing_genome=self.names,
                               user_attr_keys=(st.BITS_ATTR,))
        complete = [i for i in range(len(table)) if table.state[i] == "COMPLETE" and table.values[i] is not None]
        info = {}
        losses, mems, feas, numbers, genomes = [], [], [], [], []
        for i in complete:
            idx = self.codec.parse(table.genome[i]) if table.genome[i] else None
            if idx is None:
                continue
            values = table.values[i]
            feasible = all(v <= 0 for v in table.constraints[i].values())
            losses.append(values[0])
            mems.append(values[1])
            feas.append(feasible)
            numbers.append(table.number[i])
            genomes.append(idx)
            info[table.trial_id[i]] = (idx, values, table.generation[i], table.constraints[i])
        self.archive.add(losses, mems, feas, numbers, genomes)
        self.archive.refresh_front()
        self.n_complete = len(complete)
        self._new_window(seed_offset=len(table))
        gens = [g for (_, _, g, _) in info.values() if g is not None]
        if not gens:
            return 0, self.P
        G = max(gens)
        count = sum(1 for g in gens if g == G)
        by_gen: dict[int, list[int]] = {}
        for rid, (_, _, g, _) in info.items():
            if g is not None:
                by_gen.setdefault(g, []).append(rid)
        next_gen, missing = (G + 1, self.P) if count >= self.P else (G, self.P - count)
        # The window needs the population the next generation is bred from and its parents, plus the
        # parent cache for it; if that is missing (not written by EMPAS), give the sampler everything.
        need_cache = next_gen - 1 if count >= self.P else next_gen
        cached = st.study_system_attr(self.storage, self.study_id, self.parent_prefix + str(need_cache)) \
            if need_cache >= 1 else []
        if cached is not None and all(r in info for r in cached):
            ids = list(dict.fromkeys(list(cached) + by_gen.get(G, [])))
            self._window_add([self._frozen(info[r][0], info[r][1], info[r][2], info[r][3]) for r in ids], ids)
            if need_cache >= 1:
                self._set_window_parents(need_cache, list(cached))
        else:
            ids = [r for r in info if info[r][2] is not None]
            self._window_add([self._frozen(info[r][0], info[r][1], info[r][2], info[r][3]) for r in ids], ids)
            for g in sorted(by_gen):
                c = st.study_system_attr(self.storage, self.study_id, self.parent_prefix + str(g))
                if c is not None and all(r in self.rdb_to_mem for r in c):
                    self._set_window_parents(g, list(c))
        return next_gen, missing

    # -- seeds ------------------------------------------------------------------------------------
    def seeds(self, extra: list[np.ndarray]) -> list[np.ndarray]:
        out = [self.space.uniform(b).astype(np.int8) for b in self.space.bits]
        out.extend(np.asarray(g, dtype=np.int8) for g in extra)
        k = int(self.settings.seed_front or 0)
        if k > 0 and len(self.exact):
            picks = np.unique(np.linspace(0, len(self.exact) - 1, min(k, len(self.exact))).round().astype(int))
            out.extend(self.exact.genomes[p].astype(np.int8) for p in picks)
        unique: dict[bytes, np.ndarray] = {}
        for g in out:
            unique.setdefault(g.tobytes(), g)
        return list(unique.values())[: self.P]

    # -- one generation ---------------------------------------------------------------------------
    def sample(self, generation: int) -> np.ndarray:
        from optuna.trial import FrozenTrial, TrialState

        ft = FrozenTrial(number=0, state=TrialState.RUNNING, value=None, datetime_start=datetime.now(),
                         datetime_complete=None, params={}, distributions={}, user_attrs={},
                         system_attrs={self.gen_key: generation}, intermediate_values={}, trial_id=-1)
        params = self.sampler.sample_relative(self.window, ft, self.dists) if generation > 0 else {}
        for name in self.names:
            if name not in params:
                params[name] = self.sampler.sample_independent(self.window, ft, name, self.dist)
        return np.array([self.codec.lookup[int(params[n])] for n in self.names], dtype=np.int8)

    def parents_rdb(self, generation: int) -> list[int] | None:
        if generation < 1:
            return None
        cached = self.window._storage.get_study_system_attrs(self.window._study_id).get(
            self.parent_prefix + str(generation))
        return None if cached is None else [self.mem_to_rdb[m] for m in cached]

    def write(self, generation: int, genomes: list[np.ndarray], loss: np.ndarray, memory: np.ndarray,
              extra: list[dict] | None = None) -> int:
        """Persist one batch of finished children of ``generation``; returns how many got params."""
        avg = self.average_bits(np.stack(genomes))
        cons = _constraint_values(self.settings, memory, avg)
        feasible = np.ones(len(genomes), dtype=bool)
        for v in cons.values():
            feasible &= v <= 0
        with_params = np.ones(len(genomes), dtype=bool) if self.policy == "all" else \
            self.archive.candidate_front(loss, memory, feasible)
        now = st.now_utc()
        rows = []
        for k, idx in enumerate(genomes):
            user = {st.BITS_ATTR: self.codec.text(idx), "avg_bits": round(float(avg[k]), 4)}
            if extra:
                user.update(extra[k])
            system = {self.gen_key: int(generation)}
            system.update({st.CONSTRAINT_PREFIX + name: float(v[k]) for name, v in cons.items()})
            params = {n: float(j) for n, j in zip(self.names, np.asarray(idx, dtype=np.int64).tolist())} \
                if with_params[k] else None
            rows.append(st.TrialRow(values=(float(loss[k]), float(memory[k])), params=params, user_attrs=user,
                                    system_attrs=system, datetime_start=now, datetime_complete=now))
        parents = self.parents_rdb(generation)
        cache = {self.parent_prefix + str(generation): parents} if parents is not None else None
        try:
            written = st.insert_trials(self.storage, self.study_id, rows, self.dist_json, cache)
        except Exception as exc:  # noqa: BLE001 - a database error: one line, nothing half-written
            from sqlalchemy.exc import SQLAlchemyError

            if isinstance(exc, SQLAlchemyError):
                raise st.storage_error(self.url, exc) from None
            raise
        frozen = [self._frozen(idx, (loss[k], memory[k]), generation, {n: v[k] for n, v in cons.items()})
                  for k, idx in enumerate(genomes)]
        self._window_add(frozen, [w.trial_id for w in written])
        self.archive.add(loss, memory, feasible, [w.number for w in written], genomes,
                         [e for e in extra] if extra else None)
        self.archive.refresh_front()
        self.n_complete += len(written)
        return int(with_params.sum())

    # -- front reporting --------------------------------------------------------------------------
    def front_points(self) -> list[FrontPoint]:
        a = self.archive
        out = []
        for i in a.front.tolist():
            idx = a.genomes[i]
            predicted = float(self.space.predicted_loss(np.asarray(idx, dtype=np.int64)))
            measured = None
            if self.measured:
                measured = {"loss": a.loss[i], "kl": a.loss[i] - self.space.base_loss}
            out.append(FrontPoint(trial_number=a.number[i], bits=self.codec.bits[np.asarray(idx, np.int64)].tolist(),
                                  predicted_loss=predicted, memory_bytes=int(a.memory[i]), measured=measured,
                                  average_bits=float(self.average_bits(idx)), feasible=True))
        return out

    def hv_ratio(self) -> float | None:
        if self.measured or self.exact_hv <= 0:
            return None
        a = self.archive
        if not len(a.front):
            return 0.0
        loss = np.asarray(a.loss)[a.front]
        memory = np.asarray(a.memory)[a.front]
        return float(self.scale.hypervolume(loss, memory) / self.exact_hv)


def run_search(settings: SearchSettings, profile: Profile, storage_url: str | None,
               progress: Callable[[SearchEvent], None] | None = None, should_stop=None,
               runner=None) -> SearchResult:
    """Create or resume the study and run NSGA-II for ``settings.trials`` more trials.

    ``should_stop`` (a ``threading.Event`` or a callable) is checked between generations (between
    trials in measured mode); the finished part is persisted and the result says ``stopped``.
    """
    started = time.perf_counter()
    settings.validate()
    if len(profile.bits) < 2:
        raise SearchError(f"the profile has only bits {profile.bits}: pass at least two bit-widths")
    url = resolve_storage_url(storage_url)
    storage = st.open_storage(url)
    try:
        return _run_search(settings, profile, url, storage, progress, should_stop, runner, started)
    finally:
        storage.engine.dispose()


def _run_search(settings: SearchSettings, profile: Profile, url: str, storage, progress, should_stop, runner,
                started: float, _retry: bool = False) -> SearchResult:
    _quiet_optuna()
    original, profile_in = settings, profile
    evaluate = settings.evaluate or "proxy"
    name = settings.study_name or default_study_name(profile, evaluate)
    study_id = _study_id(storage, name)
    stored_settings = None
    resumed = False
    if study_id is not None:
        attrs = storage.get_study_user_attrs(study_id)
        if attrs.get(ATTR + "schema") is None:
            if st.trial_counts(storage).get(study_id):
                raise SearchError(f"study {name!r} in {redact(url)} is not an EMPAS study: pass another --study")
            st.delete_study_rows(storage, study_id)  # left half-created by an interrupted run
            study_id = None
        else:
            stored_profile = _stored_profile(attrs, name)
            _check_compatible(name, stored_profile, profile)
            profile = stored_profile
            stored_settings = _stored_settings(attrs, name)
            resumed = True
    settings = settings.resolved(stored_settings, name)
    if settings.min_avg_bits is not None and not min(profile.bits) <= settings.min_avg_bits <= max(profile.bits):
        raise SearchError(f"--min-avg-bits {settings.min_avg_bits} is outside the bits {profile.bits}")
    run = _Run(settings, profile, storage, study_id or -1, url, runner, progress, should_stop, resumed)
    if study_id is None:
        study_id = _create_study(storage, name, profile, settings)
        if study_id is None:  # another worker created it a moment ago: join it as a resume
            if _retry:
                raise SearchError(f"study {name!r} was just created by another process: run the command again")
            return _run_search(original, profile_in, url, storage, progress, should_stop, runner, started,
                               _retry=True)
        run.study_id = study_id
    else:
        st.set_study_user_attrs(storage, study_id, {ATTR + "settings": settings.stored()})
    next_gen, missing = run.load_existing()
    seed_extra: list[np.ndarray] = []
    if settings.seed_from:
        other = load_front(url, settings.seed_from)
        if other.profile.gene_names != profile.gene_names or list(other.profile.bits) != list(profile.bits):
            raise SearchError(f"study {settings.seed_from!r} has another genome: it cannot seed {name!r}")
        seed_extra = [profile.bit_index(p.bits) for p in other.points]
    P = run.P
    target = settings.trials if settings.trials is not None else (
        settings.generations * P if settings.generations is not None else
        {"proxy": 5000, "measured": 100}[settings.evaluate])
    first_gen_missing = missing if missing < P else 0
    target = first_gen_missing + math.ceil(max(0, target - first_gen_missing) / P) * P
    done = 0
    params_trials = 0
    first_generation = next_gen
    stopped = False
    total_before = run.n_complete
    optuna_seeds = run.seeds(seed_extra) if (next_gen == 0 and missing == P) else []

    def emit(kind: str, generation: int) -> None:
        if progress is None:
            return
        elapsed = time.perf_counter() - started
        progress(SearchEvent(kind=kind, study_name=name, generation=generation, trials_done=done,
                             trials_target=target, trials_total=run.n_complete, elapsed=elapsed,
                             trials_per_s=done / elapsed if elapsed > 0 else 0.0, front=run.front_points(),
                             hypervolume_ratio=run.hv_ratio()))

    emit("start", next_gen)
    generation = next_gen
    while done < target:
        if _stop_requested(should_stop):
            stopped = True
            break
        generation, count = next_gen, min(missing, target - done)
        seeds = optuna_seeds if generation == 0 else []
        optuna_seeds = []
        if not run.measured:
            genomes = list(seeds[:count]) + [run.sample(generation) for _ in range(count - len(seeds[:count]))]
            loss, memory = run.evaluate_proxy(np.stack(genomes))
            params_trials += run.write(generation, genomes, loss, memory)
            done += len(genomes)
            missing -= len(genomes)
        else:
            queue = list(seeds[:count])
            for _ in range(count):
                if _stop_requested(should_stop):
                    stopped = True
                    break
                idx = queue.pop(0) if queue else run.sample(generation)
                kl = run.measure(idx)
                loss = np.array([run.space.base_loss + kl])
                _, memory = run.evaluate_proxy(idx[None, :])
                predicted = float(run.space.predicted_loss(np.asarray(idx, dtype=np.int64)))
                params_trials += run.write(generation, [idx], loss, memory,
                                           [{"predicted_loss": predicted, "measured_kl": kl}])
                done += 1
                missing -= 1
                emit("trial", generation)
            if stopped:
                break
        if missing <= 0:
            run._maybe_shrink_window(generation)
            next_gen, missing = generation + 1, P
        emit("generation", generation)
    seconds = time.perf_counter() - started
    emit("stopped" if stopped else "done", generation)
    return SearchResult(
        study_name=name, storage=redact(url), evaluate=settings.evaluate, trials_run=done,
        trials_total=run.n_complete, first_generation=first_generation, last_generation=generation,
        seconds=seconds, trials_per_s=done / seconds if seconds > 0 else 0.0, front=run.front_points(),
        hypervolume_ratio=run.hv_ratio(), exact_front_points=len(run.exact), resumed=resumed,
        stopped=stopped, params_trials=params_trials, settings=settings.to_dict(),
        gene_names=list(profile.gene_names))


def _create_study(storage, name: str, profile: Profile, settings: SearchSettings) -> int | None:
    """The study with every attribute, in one transaction; None if another worker created it first."""
    loss_name = "measured_loss" if settings.evaluate == "measured" else "predicted_loss"
    attrs = {ATTR + key: value for key, value in (
        ("model_id", profile.model_id), ("model_fingerprint", profile.model_fingerprint),
        ("granularity", profile.granularity), ("metric", profile.metric), ("bits", list(profile.bits)),
        ("n_genes", profile.n_genes), ("quantizer", profile.quantizer), ("profile_key", profile.key),
        ("evaluate", settings.evaluate), ("settings", settings.stored()),
        ("genome_attr", f"trial user attribute {st.BITS_ATTR!r}: one bit-width per gene, in the order of "
                        f"the profile's gene_names"))}
    attrs.update(st.json_chunks(ATTR + "profile", profile.to_dict()))
    attrs[ATTR + "schema"] = SCHEMA
    return st.create_study_rows(storage, name, 2, {"study:metric_names": [loss_name, "memory_bytes"]}, attrs)


# -- reading studies -----------------------------------------------------------------------------

def _disposing(fn):
    """Run ``fn(url, storage, *args)`` on a freshly opened storage and release its connections after
    (the TUI calls these functions many times in one process)."""
    import functools

    @functools.wraps(fn)
    def wrapper(storage_url, *args, **kwargs):
        url = resolve_storage_url(storage_url)
        storage = st.open_storage(url)
        try:
            return fn(url, storage, *args, **kwargs)
        finally:
            storage.engine.dispose()

    return wrapper


def _existing_id(url: str, storage, study_name: str) -> int:
    study_id = _study_id(storage, study_name)
    if study_id is None:
        raise SearchError(f"no study named {study_name!r} in {redact(url)}: list them with `empas studies`")
    return study_id


@_disposing
def load_front(url: str, storage, study_name: str) -> FrontData:
    """``load_front(storage_url, study_name)``: the study's feasible Pareto front (memory ascending), with
    its profile and settings."""
    study_id = _existing_id(url, storage, study_name)
    attrs = storage.get_study_user_attrs(study_id)
    if attrs.get(ATTR + "schema") is None:
        raise SearchError(f"study {study_name!r} is not an EMPAS study: pass another --study")
    profile = _stored_profile(attrs, study_name)
    space = SearchSpace.from_profile(profile)
    settings = _stored_settings(attrs, study_name)
    evaluate = attrs.get(ATTR + "evaluate", "proxy")
    codec = _Genomes(space)
    table = st.read_trials(storage, study_id, with_params_for_missing_genome=space.gene_names,
                           user_attr_keys=(st.BITS_ATTR,))
    rows = [i for i in range(len(table)) if table.state[i] == "COMPLETE" and table.values[i] is not None
            and all(v <= 0 for v in table.constraints[i].values())]
    loss = np.array([table.values[i][0] for i in rows], dtype=np.float64)
    memory = np.array([table.values[i][1] for i in rows], dtype=np.float64)
    mask = _weak_front_mask(loss, memory)
    points = []
    bits_arr = np.asarray(space.bits, dtype=np.float64)
    for i, keep in zip(rows, mask):
        if not keep:
            continue
        idx = codec.parse(table.genome[i]) if table.genome[i] else None
        if idx is None:
            continue
        idx64 = idx.astype(np.int64)
        measured = None
        if evaluate == "measured":
            measured = {"loss": table.values[i][0], "kl": table.values[i][0] - profile.base_loss}
        points.append(FrontPoint(trial_number=table.number[i], bits=codec.bits[idx64].tolist(),
                                 predicted_loss=float(space.predicted_loss(idx64)),
                                 memory_bytes=int(table.values[i][1]), measured=measured,
                                 average_bits=float((bits_arr[idx64] * space.gene_params).sum() / space.gene_params.sum())))
    points.sort(key=lambda p: (p.memory_bytes, p.loss, p.trial_number))
    ratio = None
    if evaluate == "proxy" and points:
        cons = SearchSettings(max_mib=settings.get("max_mib"), min_avg_bits=settings.get("min_avg_bits"))
        exact = exact_points(space, cons)
        scale = FrontScale([p.predicted_loss for p in exact], [p.memory_bytes for p in exact])
        hv_exact = scale.hypervolume([p.predicted_loss for p in exact], [p.memory_bytes for p in exact])
        if hv_exact > 0:
            ratio = scale.hypervolume([p.predicted_loss for p in points], [p.memory_bytes for p in points]) / hv_exact
    n_complete = sum(1 for s in table.state if s == "COMPLETE")
    return FrontData(study_name=study_name, profile=profile, space=space, settings=settings, points=points,
                     trials_complete=n_complete, evaluate=evaluate, hypervolume_ratio=ratio)


def exact_points(space: SearchSpace, settings: SearchSettings | None = None) -> list[FrontPoint]:
    """The exact Pareto front of the proxy (filtered by the settings' constraints), as FrontPoints."""
    front = front_for_space(space)
    bits = np.asarray(space.bits, dtype=np.int64)
    avg = (bits[front.genomes].astype(np.float64) * space.gene_params).sum(axis=1) / space.gene_params.sum()
    ok = np.ones(len(front), dtype=bool)
    if settings is not None:
        for v in _constraint_values(settings, front.memory.astype(np.float64), avg).values():
            ok &= v <= 0
    return [FrontPoint(trial_number=-1, bits=bits[front.genomes[i]].tolist(), predicted_loss=float(front.loss[i]),
                       memory_bytes=int(front.memory[i]), average_bits=float(avg[i]))
            for i in np.flatnonzero(ok)]


@_disposing
def study_info(url: str, storage, study_name: str) -> dict | None:
    """``study_info(storage_url, study_name)``: the stored profile, settings and evaluate mode of an EMPAS
    study, or None if there is no such study."""
    study_id = _study_id(storage, study_name)
    if study_id is None:
        return None
    attrs = storage.get_study_user_attrs(study_id)
    if attrs.get(ATTR + "schema") is None:
        raise SearchError(f"study {study_name!r} is not an EMPAS study: pass another --study")
    return {"profile": _stored_profile(attrs, study_name), "settings": _stored_settings(attrs, study_name),
            "evaluate": attrs.get(ATTR + "evaluate", "proxy")}


@_disposing
def list_studies(url: str, storage) -> list[dict]:
    """``list_studies(storage_url)``: one dict per study in the storage: name, model, granularity, genes,
    trials, front summary, last update."""
    counts = st.trial_counts(storage)
    out = []
    for study in storage.get_all_studies():
        attrs = study.user_attrs
        sid = study._study_id
        c = counts.get(sid, {"states": {}, "last": None})
        entry = {"name": study.study_name, "empas": attrs.get(ATTR + "schema") is not None,
                 "model": attrs.get(ATTR + "model_id"), "granularity": attrs.get(ATTR + "granularity"),
                 "n_genes": attrs.get(ATTR + "n_genes"), "bits": attrs.get(ATTR + "bits"),
                 "evaluate": attrs.get(ATTR + "evaluate"),
                 "trials_complete": c["states"].get("COMPLETE", 0),
                 "trials_other": {k: v for k, v in c["states"].items() if k != "COMPLETE"},
                 "last_update": (st.utc_to_local(c["last"]).isoformat(timespec="seconds") if c["last"] else None)}
        table = st.read_trials(storage, sid, user_attr_keys=())
        rows = [i for i in range(len(table)) if table.state[i] == "COMPLETE" and table.values[i] is not None
                and len(table.values[i]) == 2 and all(v <= 0 for v in table.constraints[i].values())]
        loss = np.array([table.values[i][0] for i in rows])
        memory = np.array([table.values[i][1] for i in rows])
        mask = _weak_front_mask(loss, memory)
        order = np.lexsort((loss[mask], memory[mask])) if mask.any() else np.zeros(0, dtype=int)
        fl, fm = loss[mask][order], memory[mask][order]
        picks = np.unique(np.linspace(0, len(fl) - 1, min(5, len(fl))).round().astype(int)) if len(fl) else []
        entry["front_size"] = int(len(fl))
        entry["best_points"] = [{"memory_mib": float(fm[p] / MIB), "loss": float(fl[p])} for p in picks]
        out.append(entry)
    return out


@_disposing
def delete_study(url: str, storage, name: str) -> None:
    """``delete_study(storage_url, name)``: the study and all its trials, in one transaction."""
    study_id = _existing_id(url, storage, name)
    try:
        st.delete_study_rows(storage, study_id)
    except Exception as exc:  # noqa: BLE001
        from sqlalchemy.exc import SQLAlchemyError

        if isinstance(exc, SQLAlchemyError):
            raise st.storage_error(url, exc) from None
        raise


__all__ = ["SearchSettings", "SearchEvent", "SearchResult", "FrontPoint", "FrontData", "SearchError",
           "run_search", "list_studies", "load_front", "delete_study", "default_study_name", "exact_points",
           "study_info"]
