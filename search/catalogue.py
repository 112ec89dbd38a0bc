"""Reading the studies of a database: their list, one study's front, its settings, deleting one.

Every function takes a :class:`storage.database.Database` (opened once per process) and reads
column-wise (:func:`storage.studies.read_trials`), never through a FrozenTrial per trial. Fronts are
the distinct non-dominated feasible points (:mod:`search.pareto`), so the CLI, the TUI and the
listing report the same count for a study.
"""

from __future__ import annotations

import numpy as np
from storage import studies as st
from storage.database import database_errors
from storage.optuna_adapter import frozen_study_id

from . import study_record as record
from .exact_front import front_for_space
from .hypervolume import FrontScale
from .pareto import non_dominated
from .results import FrontData, FrontPoint
from .settings import SearchError, SearchSettings, constraint_values
from .space import MIB, SearchSpace


def _guarded(fn):
    """A database failure while reading becomes the one-line storage error."""
    import functools

    @functools.wraps(fn)
    def wrapper(db, *args, **kwargs):
        with database_errors(db.url):
            return fn(db, *args, **kwargs)

    return wrapper


def _existing_id(db, study_name: str) -> int:
    sid = record.study_id(db.optuna, study_name)
    if sid is None:
        raise SearchError(f"no study named {study_name!r} in {db.redacted}: list them with `empas studies`")
    return sid


def _feasible_complete(table) -> list[int]:
    return [i for i in range(len(table)) if table.state[i] == "COMPLETE" and table.values[i] is not None
            and len(table.values[i]) == 2 and all(v <= 0 for v in table.constraints[i].values())]


@_guarded
def load_front(db, study_name: str) -> FrontData:
    """The study's feasible Pareto front (memory ascending), with its profile and settings."""
    sid = _existing_id(db, study_name)
    attrs = db.optuna.get_study_user_attrs(sid)
    record.check_schema(attrs, study_name)
    profile = record.stored_profile(attrs, study_name)
    space = SearchSpace.from_profile(profile)
    settings = record.stored_settings(attrs, study_name)
    evaluate = record.stored_evaluate(attrs)
    table = st.read_trials(db.optuna, sid, with_params_for_missing_genome=space.gene_names,
                           user_attr_keys=(st.GENOME_ATTR,))
    rows = [i for i in _feasible_complete(table) if table.genome[i] and space.parse(table.genome[i]) is not None]
    loss = np.array([table.values[i][0] for i in rows], dtype=np.float64)
    memory = np.array([table.values[i][1] for i in rows], dtype=np.float64)
    points = []
    for k in non_dominated(memory, loss):
        i = rows[int(k)]
        idx = space.parse(table.genome[i]).astype(np.int64)
        measured = None
        if evaluate == "measured":
            measured = {"loss": table.values[i][0], "kl": table.values[i][0] - profile.base_loss}
        points.append(FrontPoint(trial_number=table.number[i], qtypes=space.qtypes_of(idx),
                                 predicted_loss=float(space.predicted_loss(idx)),
                                 memory_bytes=int(table.values[i][1]), measured=measured,
                                 average_bits=float(space.average_bits(idx))))
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
    avg = np.atleast_1d(space.average_bits(front.genomes))
    ok = np.ones(len(front), dtype=bool)
    if settings is not None:
        for v in constraint_values(settings, front.memory.astype(np.float64), avg).values():
            ok &= v <= 0
    return [FrontPoint(trial_number=-1, qtypes=space.qtypes_of(front.genomes[i]), predicted_loss=float(front.loss[i]),
                       memory_bytes=int(front.memory[i]), average_bits=float(avg[i]))
            for i in np.flatnonzero(ok)]


@_guarded
def study_info(db, study_name: str) -> dict | None:
    """The stored profile, settings and evaluate mode of an EMPAS study, or None if there is none."""
    sid = record.study_id(db.optuna, study_name)
    if sid is None:
        return None
    attrs = db.optuna.get_study_user_attrs(sid)
    record.check_schema(attrs, study_name)
    return {"profile": record.stored_profile(attrs, study_name), "settings": record.stored_settings(attrs, study_name),
            "evaluate": record.stored_evaluate(attrs)}


@_guarded
def list_studies(db) -> list[dict]:
    """One dict per study in the storage: name, model, granularity, genes, trials, front summary."""
    storage = db.optuna
    counts = st.trial_counts(storage)
    out = []
    for study in storage.get_all_studies():
        attrs = study.user_attrs
        sid = frozen_study_id(study)
        c = counts.get(sid, {"states": {}, "last": None})
        entry = {"name": study.study_name, "empas": record.is_empas(attrs),
                 "schema_ok": attrs.get(record.ATTR + "schema") == record.SCHEMA,
                 "model": attrs.get(record.ATTR + "model_id"), "granularity": attrs.get(record.ATTR + "granularity"),
                 "n_genes": attrs.get(record.ATTR + "n_genes"), "qtypes": attrs.get(record.ATTR + "qtypes"),
                 "quantizer": (attrs.get(record.ATTR + "quantizer") or {}).get("name"),
                 "evaluate": attrs.get(record.ATTR + "evaluate"),
                 "trials_complete": c["states"].get("COMPLETE", 0),
                 "trials_other": {k: v for k, v in c["states"].items() if k != "COMPLETE"},
                 "last_update": (st.utc_to_local(c["last"]).isoformat(timespec="seconds") if c["last"] else None)}
        table = st.read_trials(storage, sid, user_attr_keys=())
        rows = _feasible_complete(table)
        loss = np.array([table.values[i][0] for i in rows], dtype=np.float64)
        memory = np.array([table.values[i][1] for i in rows], dtype=np.float64)
        front = non_dominated(memory, loss)
        fl, fm = loss[front], memory[front]
        picks = np.unique(np.linspace(0, len(fl) - 1, min(5, len(fl))).round().astype(int)) if len(fl) else []
        entry["front_size"] = int(len(fl))
        entry["best_points"] = [{"memory_mib": float(fm[p] / MIB), "loss": float(fl[p])} for p in picks]
        out.append(entry)
    return out


@_guarded
def delete_study(db, name: str) -> None:
    """The study and all its trials, in one transaction."""
    st.delete_study_rows(db.optuna, _existing_id(db, name))
