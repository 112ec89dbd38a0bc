"""The persistent NSGA-II search: an Optuna study per (model, genome, qtypes), resumable, fast.

How a run works, and why:

- **Sampling is Optuna's NSGAIISampler**, driven generation by generation: each child is drawn with the
  sampler's own ``sample_relative`` (parent selection, uniform crossover, mutation) and
  ``sample_independent`` (generation 0 and mutated genes) on a small in-memory *window* study that holds
  the last generation and its parents. Going through ``study.ask`` + 210 ``suggest_categorical`` costs
  ~30 ms a trial in Optuna's bookkeeping alone (bench/bench_search.py); calling the sampler directly
  costs ~3 ms. Each gene is one categorical over the qtypes that fit it.
- **Evaluation is vectorised** over the whole generation (the proxy objectives are table look-ups), or
  one trial at a time in ``measured`` mode (real KL with every gene quantised, through ``measure``).
- **Persistence is one transaction per generation** (:mod:`storage.studies`): the trials go into
  Optuna's RDB schema as COMPLETE trials with the sampler's generation attribute and its parent cache,
  so ``optuna.load_study`` reads them, a resumed run continues the generation count, and a stop never
  leaves a RUNNING trial. Every trial carries its genome as the compact user attribute ``genome``;
  trials that are on the (feasible) Pareto front when written also get one categorical param per gene
  (at ``block`` granularity, and under ``params="all"``, every trial does). A trial that is dominated
  when written stays dominated, so the front is always there as params.
- **Constraints** use Optuna 5's mechanism (``constraints:<name>`` trial system attributes, what
  ``Trial.set_constraint`` writes): NSGA-II applies constrained domination and ``study.best_trials``
  ignores infeasible trials, which are kept.
- **Seeds**: generation 0 starts with the uniform genomes and points spread along the exact front of
  the proxy; they carry the generation attribute, so NSGA-II selects from them.
"""

from __future__ import annotations

import math
import time
from datetime import datetime
from typing import Callable

import numpy as np

from profiling.profile import Profile
from storage import studies as st
from storage.database import database_errors
from storage.optuna_adapter import nsga_keys, study_storage, trial_id, window_trial_class
from storage.urls import redact

from . import study_record as record
from .exact_front import ExactFront, front_for_space
from .hypervolume import FrontScale
from .pareto import non_dominated
from .results import FrontPoint, SearchEvent, SearchResult
from .settings import SearchError, SearchSettings, constraint_values
from .space import MIB, SearchSpace

AUTO_ALL_PARAMS_MAX_GENES = 64  # "auto": every trial as params up to this many genes (block: 30)
WINDOW_GENERATIONS = 8  # the in-memory window is rebuilt once it holds this many populations

Measure = Callable[[list], float]  # a genome's qtypes -> measured mean KL to dense


def stop_requested(should_stop) -> bool:
    if should_stop is None:
        return False
    if hasattr(should_stop, "is_set"):
        return bool(should_stop.is_set())
    return bool(should_stop())


def _quiet_optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


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
        """Which of a new batch would be on the front if added now (copies of a front point too: Optuna
        counts them among its best trials)."""
        fl = np.asarray(self.loss)[self.front] if len(self.front) else np.zeros(0)
        fm = np.asarray(self.memory)[self.front] if len(self.front) else np.zeros(0)
        all_loss = np.concatenate([fl, np.where(feasible, loss, np.nan)])
        all_mem = np.concatenate([fm, np.where(feasible, memory, np.nan)])
        keep = non_dominated(all_mem, all_loss, keep_ties=True)
        mask = np.zeros(len(all_loss), dtype=bool)
        mask[keep] = True
        return mask[len(fl):] & feasible

    def refresh_front(self) -> None:
        """Fold the trials added since the last call into the front (sorted by memory)."""
        loss = np.asarray(self.loss)
        memory = np.asarray(self.memory)
        feasible = np.asarray(self.feasible, dtype=bool)
        new = np.arange(self._seen, len(loss))
        cand = np.concatenate([self.front, new[feasible[new]]]).astype(np.int64)
        if len(cand):
            cand = cand[non_dominated(memory[cand], loss[cand], keep_ties=True)]
        self.front = cand
        self._seen = len(loss)


class _Run:
    """One run of the search on one study: the sampler's window, the archive, writes per generation."""

    def __init__(self, settings: SearchSettings, profile: Profile, db, study_id: int,
                 measure: Measure | None = None, resumed: bool = False):
        self.optuna = _quiet_optuna()
        from optuna.distributions import CategoricalDistribution, distribution_to_json
        from optuna.samplers import NSGAIISampler

        self.settings, self.profile, self.db, self.study_id = settings, profile, db, study_id
        self.storage, self.url = db.optuna, db.url
        self.measure_kl, self.resumed = measure, resumed
        self.space = SearchSpace.from_profile(profile)
        self.names = list(self.space.gene_names)
        # Each gene's own categorical: only the qtypes that fit it (labels, so the dashboard reads them).
        self.choices = [self.space.choices(i) for i in range(self.space.n_genes)]
        self.dists = {n: CategoricalDistribution([self.space.qtypes[j] for j in c])
                      for n, c in zip(self.names, self.choices)}
        self.dist_json = {n: distribution_to_json(d) for n, d in self.dists.items()}
        self.position = [{j: k for k, j in enumerate(c)} for c in self.choices]  # column -> choice index
        self.column = {q: j for j, q in enumerate(self.space.qtypes)}
        self.gen_key, self.parent_prefix = nsga_keys()
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
        if self.measured and self.measure_kl is None:
            raise SearchError("measured evaluation needs the model: run `empas search --evaluate measured` "
                              "with the model options")
        self.kl_cache: dict[bytes, float] = {}

    # -- reference front and constraints ----------------------------------------------------------
    def _exact_front(self) -> ExactFront:
        front = front_for_space(self.space)
        avg = self.space.average_bits(front.genomes)
        cons = constraint_values(self.settings, front.memory.astype(np.float64), avg)
        ok = np.ones(len(front), dtype=bool)
        for v in cons.values():
            ok &= v <= 0
        if not ok.any():
            smallest = front.memory.min() / MIB
            raise SearchError(f"no genome meets the constraints (the smallest model is {smallest:.1f} MiB): "
                              f"raise --max-mib or lower --min-avg-bits")
        return ExactFront(memory=front.memory[ok], loss=front.loss[ok], genomes=front.genomes[ok])

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate_proxy(self, idx: np.ndarray):
        idx = np.asarray(idx, dtype=np.int64)
        loss = self.space.predicted_loss(idx)
        memory = self.space.memory_bytes(idx).astype(np.float64)
        return np.atleast_1d(loss), np.atleast_1d(memory)

    def measure(self, idx: np.ndarray) -> float:
        key = np.asarray(idx, dtype=np.int8).tobytes()
        if key not in self.kl_cache:
            self.kl_cache[key] = float(self.measure_kl(self.space.qtypes_of(idx)))
        return self.kl_cache[key]

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
        system_attrs = {self.gen_key: int(generation)}
        system_attrs.update({st.CONSTRAINT_PREFIX + k: float(v) for k, v in constraints.items()})
        return window_trial_class()(number=0, state=TrialState.COMPLETE, value=None, values=[float(v) for v in values],
                                    datetime_start=now, datetime_complete=now,
                                    params=dict(zip(self.names, self.space.qtypes_of(idx))),
                                    distributions=self.dists, user_attrs={}, system_attrs=system_attrs,
                                    intermediate_values={}, trial_id=-1)

    def _window_add(self, frozen_trials: list, rdb_ids: list[int]) -> None:
        # Straight into the in-memory storage: these trials are valid by construction (Study.add_trial
        # would validate every param again) and cheap to copy (see _window_trial_class).
        storage, study_id = study_storage(self.window)
        for ft, rid in zip(frozen_trials, rdb_ids):
            mem_id = storage.create_new_trial(study_id, template_trial=ft)
            self.mem_to_rdb[mem_id] = rid
            self.rdb_to_mem[rid] = mem_id
        self.window_trials += len(frozen_trials)

    def _set_window_parents(self, generation: int, rdb_ids: list[int]) -> None:
        storage, study_id = study_storage(self.window)
        storage.set_study_system_attr(study_id, self.parent_prefix + str(generation),
                                      [self.rdb_to_mem[r] for r in rdb_ids])

    def _maybe_shrink_window(self, generation: int) -> None:
        """Keep only the last generation and its parents (what the next one is bred from)."""
        if self.window_trials <= WINDOW_GENERATIONS * self.P or generation < 1:
            return
        parents = self.sampler.get_parent_population(self.window, generation)
        population = self.sampler.get_population(self.window, generation)
        keep = [(t, self.mem_to_rdb[trial_id(t)]) for t in parents + population]
        parent_rdb = [self.mem_to_rdb[trial_id(t)] for t in parents]
        self._reset_window_study()
        self._window_add([t for t, _ in keep], [r for _, r in keep])
        self._set_window_parents(generation, parent_rdb)

    # -- resume ------------------------------------------------------------------------------------
    def load_existing(self) -> tuple[int, int]:
        """Read the study's trials into the archive and the window; return (next generation, children
        still missing in it)."""
        table = st.read_trials(self.storage, self.study_id, with_params_for_missing_genome=self.names,
                               user_attr_keys=(st.GENOME_ATTR,))
        complete = [i for i in range(len(table)) if table.state[i] == "COMPLETE" and table.values[i] is not None]
        info = {}
        losses, mems, feas, numbers, genomes = [], [], [], [], []
        for i in complete:
            idx = self.space.parse(table.genome[i]) if table.genome[i] else None
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
        out = [self.space.uniform(q).astype(np.int8) for q in self.space.qtypes]
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
                params[name] = self.sampler.sample_independent(self.window, ft, name, self.dists[name])
        return np.array([self.column[str(params[n])] for n in self.names], dtype=np.int8)

    def parents_rdb(self, generation: int) -> list[int] | None:
        if generation < 1:
            return None
        storage, study_id = study_storage(self.window)
        cached = storage.get_study_system_attrs(study_id).get(self.parent_prefix + str(generation))
        return None if cached is None else [self.mem_to_rdb[m] for m in cached]

    def write(self, generation: int, genomes: list[np.ndarray], loss: np.ndarray, memory: np.ndarray,
              extra: list[dict] | None = None) -> int:
        """Persist one batch of finished children of ``generation``; returns how many got params."""
        avg = np.atleast_1d(self.space.average_bits(np.stack(genomes)))
        cons = constraint_values(self.settings, memory, avg)
        feasible = np.ones(len(genomes), dtype=bool)
        for v in cons.values():
            feasible &= v <= 0
        with_params = np.ones(len(genomes), dtype=bool) if self.policy == "all" else \
            self.archive.candidate_front(loss, memory, feasible)
        now = st.now_utc()
        rows = []
        for k, idx in enumerate(genomes):
            user = {st.GENOME_ATTR: self.space.text(idx), "avg_bits": round(float(avg[k]), 4)}
            if extra:
                user.update(extra[k])
            system = {self.gen_key: int(generation)}
            system.update({st.CONSTRAINT_PREFIX + name: float(v[k]) for name, v in cons.items()})
            params = {n: float(pos[j]) for n, pos, j in zip(self.names, self.position,
                                                             np.asarray(idx, dtype=np.int64).tolist())} \
                if with_params[k] else None
            rows.append(st.TrialRow(values=(float(loss[k]), float(memory[k])), params=params, user_attrs=user,
                                    system_attrs=system, datetime_start=now, datetime_complete=now))
        parents = self.parents_rdb(generation)
        cache = {self.parent_prefix + str(generation): parents} if parents is not None else None
        with database_errors(self.url):  # one line; the transaction leaves nothing half-written
            written = st.insert_trials(self.storage, self.study_id, rows, self.dist_json, cache)
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
        """The distinct front (one point per (memory, loss)), as every screen and command shows it."""
        a = self.archive
        out = []
        fl, fm = np.asarray(a.loss)[a.front], np.asarray(a.memory)[a.front]
        for i in a.front[non_dominated(fm, fl)].tolist():
            idx = a.genomes[i]
            predicted = float(self.space.predicted_loss(np.asarray(idx, dtype=np.int64)))
            measured = None
            if self.measured:
                measured = {"loss": a.loss[i], "kl": a.loss[i] - self.space.base_loss}
            out.append(FrontPoint(trial_number=a.number[i], qtypes=self.space.qtypes_of(idx),
                                  predicted_loss=predicted, memory_bytes=int(a.memory[i]), measured=measured,
                                  average_bits=float(self.space.average_bits(idx)), feasible=True))
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


def run_search(settings: SearchSettings, profile: Profile, db,
               progress: Callable[[SearchEvent], None] | None = None, should_stop=None,
               measure: Measure | None = None) -> SearchResult:
    """Create or resume the study in ``db`` (a :class:`storage.database.Database`) and run NSGA-II for
    ``settings.trials`` more trials.

    ``should_stop`` (a ``threading.Event`` or a callable) is checked between generations (between
    trials in measured mode); the finished part is persisted and the result says ``stopped``.
    ``measure`` (measured mode) returns the real mean KL to dense of a genome given as qtypes.
    """
    started = time.perf_counter()
    settings.validate()
    if len(profile.qtypes) < 2:
        raise SearchError(f"the profile has only {','.join(profile.qtypes)}: offer at least two qtypes")
    with database_errors(db.url):
        return _run_search(settings, profile, db, progress, should_stop, measure, started)


def _run_search(settings: SearchSettings, profile: Profile, db, progress, should_stop, measure,
                started: float, _retry: bool = False) -> SearchResult:
    _quiet_optuna()
    storage, url = db.optuna, db.url
    original, profile_in = settings, profile
    evaluate = settings.evaluate or "proxy"
    name = settings.study_name or record.default_study_name(profile, evaluate)
    sid = record.study_id(storage, name)
    stored_settings = None
    resumed = False
    if sid is not None:
        attrs = storage.get_study_user_attrs(sid)
        if not record.is_empas(attrs):
            if st.trial_counts(storage).get(sid):
                raise SearchError(f"study {name!r} in {redact(url)} is not an EMPAS study: pass another --study")
            st.delete_study_rows(storage, sid)  # left half-created by an interrupted run
            sid = None
        else:
            record.check_schema(attrs, name)
            stored = record.stored_profile(attrs, name)
            record.check_compatible(name, stored, profile)
            profile = stored
            stored_settings = record.stored_settings(attrs, name)
            resumed = True
    settings = settings.resolved(stored_settings, name)
    bits = profile.qtype_bits
    if settings.min_avg_bits is not None and not min(bits) <= settings.min_avg_bits <= max(bits):
        raise SearchError(f"--min-avg-bits {settings.min_avg_bits} is outside {min(bits):g}..{max(bits):g}, "
                          f"the bits of the offered qtypes")
    run = _Run(settings, profile, db, sid or -1, measure, resumed)
    if sid is None:
        sid = record.create_study(storage, name, profile, settings)
        if sid is None:  # another worker created it a moment ago: join it as a resume
            if _retry:
                raise SearchError(f"study {name!r} was just created by another process: run the command again")
            return _run_search(original, profile_in, db, progress, should_stop, measure, started, _retry=True)
        run.study_id = sid
    else:
        record.save_settings(storage, sid, settings)
    next_gen, missing = run.load_existing()
    seed_extra: list[np.ndarray] = []
    if settings.seed_from:
        from .catalogue import load_front

        other = load_front(db, settings.seed_from)
        if other.profile.gene_names != profile.gene_names or list(other.profile.qtypes) != list(profile.qtypes):
            raise SearchError(f"study {settings.seed_from!r} has another genome: it cannot seed {name!r}")
        seed_extra = [run.space.indices(p.qtypes) for p in other.points]
    P = run.P
    target = settings.target_trials(P)
    first_gen_missing = missing if missing < P else 0
    target = first_gen_missing + math.ceil(max(0, target - first_gen_missing) / P) * P
    done = 0
    params_trials = 0
    first_generation = next_gen
    stopped = False
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
        if stop_requested(should_stop):
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
                if stop_requested(should_stop):
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
