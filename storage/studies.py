"""Optuna studies in an RDB storage, written a generation at a time.

The studies live in Optuna's own schema, so ``optuna.load_study``, ``optuna-dashboard`` and Optuna's
samplers read them as usual. What differs is the write path: Optuna's storage API commits a trial
parameter by parameter (hundreds of statements per 210-gene trial, 150-400 ms each); here a whole
generation goes in as one transaction of ``executemany`` inserts (trials, values, params, attributes,
and the NSGA-II parent cache), which is also what makes a stop or a crash leave nothing half-written.

Readers that only need objective values, generations and genomes (resume, fronts, listings) use a few
column-wise SELECTs instead of building FrozenTrials with every parameter.

Large JSON study attributes (the profile) are split into chunks: MySQL's TEXT holds 64 KiB, and a
chunked value costs nothing on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable

from sqlalchemy import bindparam, func, select

from .database import storage_error  # noqa: F401 - the error every study write reports
from .optuna_adapter import nsga_keys, rdb_models, stored_to_intermediate, stored_to_value, value_to_stored

CHUNK_CHARS = 32_000  # below MySQL's 64 KiB TEXT limit
GENOME_ATTR = "genome"  # per-trial user attribute: the genome as "q4_k,q6_k,..." (one qtype per gene)
CONSTRAINT_PREFIX = "constraints:"


def now_utc() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)  # Optuna stores naive UTC


def _fast_storage_class():
    """An ``RDBStorage`` whose ``get_all_trials`` reads with a few column-wise SELECTs and parses each
    distinct distribution JSON once, instead of Optuna's ORM path (an object and a ``json.loads`` per
    parameter row). Same schema, same FrozenTrials; used to serve optuna-dashboard."""
    import copy

    import optuna
    from optuna.distributions import json_to_distribution
    from optuna.trial import FrozenTrial, TrialState

    class FastReadRDBStorage(optuna.storages.RDBStorage):
        def get_all_trials(self, study_id, deepcopy=True, states=None):
            trials = read_frozen_trials(self, study_id, states)
            return copy.deepcopy(trials) if deepcopy else trials

    def read_frozen_trials(storage, study_id, states=None):
        m = rdb_models()
        t, v, p = m.TrialModel.__table__, m.TrialValueModel.__table__, m.TrialParamModel.__table__
        ua, sa = m.TrialUserAttributeModel.__table__, m.TrialSystemAttributeModel.__table__
        iv = m.TrialIntermediateValueModel.__table__
        query = select(t.c.trial_id, t.c.number, t.c.state, t.c.datetime_start, t.c.datetime_complete) \
            .where(t.c.study_id == study_id).order_by(t.c.trial_id)
        if states is not None:
            query = query.where(t.c.state.in_(list(states)))
        in_study = select(t.c.trial_id).where(t.c.study_id == study_id)
        dists: dict[str, Any] = {}
        with storage.engine.connect() as conn:
            rows = conn.execute(query).all()
            wanted = {r[0] for r in rows}
            values: dict[int, dict[int, float]] = {}
            for tid, obj, val, vtype in conn.execute(select(v.c.trial_id, v.c.objective, v.c.value, v.c.value_type)
                                                     .where(v.c.trial_id.in_(in_study))):
                values.setdefault(tid, {})[obj] = stored_to_value(val, vtype)
            params: dict[int, dict[str, Any]] = {}
            pdists: dict[int, dict[str, Any]] = {}
            for tid, name, val, djson in conn.execute(
                    select(p.c.trial_id, p.c.param_name, p.c.param_value, p.c.distribution_json)
                    .where(p.c.trial_id.in_(in_study)).order_by(p.c.param_id)):
                d = dists.get(djson)
                if d is None:
                    d = dists[djson] = json_to_distribution(djson)
                params.setdefault(tid, {})[name] = d.to_external_repr(val)
                pdists.setdefault(tid, {})[name] = d
            attrs = []
            for table in (ua, sa):
                out: dict[int, dict[str, Any]] = {}
                for tid, key, vjson in conn.execute(select(table.c.trial_id, table.c.key, table.c.value_json)
                                                    .where(table.c.trial_id.in_(in_study))):
                    out.setdefault(tid, {})[key] = json.loads(vjson)
                attrs.append(out)
            inter: dict[int, dict[int, float]] = {}
            for tid, step, val, vtype in conn.execute(
                    select(iv.c.trial_id, iv.c.step, iv.c.intermediate_value, iv.c.intermediate_value_type)
                    .where(iv.c.trial_id.in_(in_study))):
                inter.setdefault(tid, {})[step] = \
                    stored_to_intermediate(val, vtype)
        trials = []
        for tid, number, state, start, complete in rows:
            vals = values.get(tid)
            trials.append(FrozenTrial(
                number=number, state=state if isinstance(state, TrialState) else TrialState[state], value=None,
                values=[vals[k] for k in sorted(vals)] if vals else None,
                datetime_start=utc_to_local(start), datetime_complete=utc_to_local(complete),
                params=params.get(tid, {}), distributions=pdists.get(tid, {}), user_attrs=attrs[0].get(tid, {}),
                system_attrs=attrs[1].get(tid, {}), intermediate_values=inter.get(tid, {}), trial_id=tid))
        del wanted
        return trials

    return FastReadRDBStorage, read_frozen_trials


def fast_read_storage(database):
    """Optuna's storage for ``database`` with the fast ``get_all_trials`` (for optuna-dashboard)."""
    base = database.optuna
    cls, _ = _fast_storage_class()
    return cls(base.url, engine_kwargs=base.engine_kwargs, skip_compatibility_check=True)


# -- chunked JSON study attributes ---------------------------------------------------------------

def set_study_user_attrs(storage, study_id: int, attrs: dict[str, Any]) -> None:
    """Set several study user attributes in one transaction (Optuna's API commits each one).

    The study row is locked first (as in :func:`insert_trials`): two workers resuming the same study on
    PostgreSQL otherwise both delete the old value and both insert, and one hits the unique key."""
    m = rdb_models()
    t = m.StudyUserAttributeModel.__table__
    studies = m.StudyModel.__table__
    rows = [{"study_id": study_id, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()]
    with storage.engine.begin() as conn:
        conn.execute(studies.update().where(studies.c.study_id == study_id).values(study_name=studies.c.study_name))
        conn.execute(t.delete().where(t.c.study_id == study_id, t.c.key.in_(list(attrs))))
        if rows:
            conn.execute(t.insert(), rows)


def create_study_rows(storage, name: str, n_objectives: int, system_attrs: dict[str, Any],
                      user_attrs: dict[str, Any]) -> int | None:
    """Create a minimising study with all its attributes in ONE transaction; None if the name is taken.

    Optuna's ``create_new_study`` commits the bare study first; a worker that starts at the same moment
    would see a study without EMPAS attributes and take it for one left half-created by a crash. Here
    another process sees either no study or a complete one."""
    from optuna.study import StudyDirection
    from sqlalchemy.exc import IntegrityError

    m = rdb_models()
    studies, directions = m.StudyModel.__table__, m.StudyDirectionModel.__table__
    ssa, sua = m.StudySystemAttributeModel.__table__, m.StudyUserAttributeModel.__table__
    try:
        with storage.engine.begin() as conn:
            study_id = int(conn.execute(studies.insert().values(study_name=name)).inserted_primary_key[0])
            conn.execute(directions.insert(), [{"study_id": study_id, "objective": k,
                                                "direction": StudyDirection.MINIMIZE} for k in range(n_objectives)])
            for table, attrs in ((ssa, system_attrs), (sua, user_attrs)):
                if attrs:
                    conn.execute(table.insert(), [{"study_id": study_id, "key": k, "value_json": json.dumps(v)}
                                                  for k, v in attrs.items()])
    except IntegrityError:  # unique study_name: another worker created it first
        return None
    return study_id


def json_chunks(key: str, obj: Any, chunk_chars: int = CHUNK_CHARS) -> dict[str, Any]:
    """``obj`` as attributes ``key`` = {"chunks": n, "chars": total} and ``key:0`` .. ``key:n-1`` strings."""
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False)
    n = max(1, math.ceil(len(text) / chunk_chars))
    out: dict[str, Any] = {f"{key}:{i}": text[i * chunk_chars:(i + 1) * chunk_chars] for i in range(n)}
    out[key] = {"chunks": n, "chars": len(text)}
    return out


def set_study_json(storage, study_id: int, key: str, obj: Any, chunk_chars: int = CHUNK_CHARS) -> None:
    set_study_user_attrs(storage, study_id, json_chunks(key, obj, chunk_chars))


def get_study_json(user_attrs: dict, key: str) -> Any:
    head = user_attrs.get(key)
    if not isinstance(head, dict) or "chunks" not in head:
        return None
    try:  # a damaged attribute (missing chunk, wrong type, bad JSON) reads as absent
        text = "".join(user_attrs[f"{key}:{i}"] for i in range(int(head["chunks"])))
        if len(text) != head.get("chars", len(text)):
            return None
        return json.loads(text)
    except (KeyError, TypeError, ValueError):
        return None


# -- bulk trial writes ---------------------------------------------------------------------------

@dataclass
class TrialRow:
    """One finished trial to insert. ``params`` maps parameter name to Optuna's internal value
    (the choice index in that gene's categorical), or is None for a compact trial (genome in user
    attrs)."""

    values: tuple[float, ...]
    params: dict[str, float] | None
    user_attrs: dict[str, Any]
    system_attrs: dict[str, Any]
    datetime_start: datetime
    datetime_complete: datetime
    state: str = "COMPLETE"


@dataclass
class WrittenTrial:
    trial_id: int
    number: int


def insert_trials(storage, study_id: int, rows: list[TrialRow], distribution_json: dict[str, str],
                  study_system_attrs: dict[str, Any] | None = None) -> list[WrittenTrial]:
    """Insert ``rows`` (and set-once study system attributes) in one transaction.

    Trial numbers follow Optuna's rule (count of the study's trials with a smaller id): the study row
    is updated first, which takes the write lock on SQLite and a row lock on PostgreSQL/MySQL, the
    same serialisation Optuna's ``create_new_trial`` relies on. ``distribution_json`` maps each
    parameter name to its distribution's JSON (each gene has its own choices).
    """
    from optuna.trial import TrialState

    m = rdb_models()
    studies = m.StudyModel.__table__
    trials = m.TrialModel.__table__
    values_t = m.TrialValueModel.__table__
    params_t = m.TrialParamModel.__table__
    uattrs_t = m.TrialUserAttributeModel.__table__
    sattrs_t = m.TrialSystemAttributeModel.__table__
    ssattrs_t = m.StudySystemAttributeModel.__table__
    if not rows and not study_system_attrs:
        return []
    written: list[WrittenTrial] = []
    with storage.engine.begin() as conn:
        conn.execute(studies.update().where(studies.c.study_id == study_id)
                     .values(study_name=studies.c.study_name))
        base = None
        for row in rows:
            result = conn.execute(trials.insert().values(
                study_id=study_id, number=None, state=TrialState[row.state],
                datetime_start=row.datetime_start, datetime_complete=row.datetime_complete))
            trial_id = int(result.inserted_primary_key[0])
            if base is None:
                base = int(conn.execute(select(func.count(trials.c.trial_id)).where(
                    trials.c.study_id == study_id, trials.c.trial_id < trial_id)).scalar_one())
            written.append(WrittenTrial(trial_id, base + len(written)))
        if written:
            conn.execute(trials.update().where(trials.c.trial_id == bindparam("tid"))
                         .values(number=bindparam("num")),
                         [{"tid": w.trial_id, "num": w.number} for w in written])
            value_rows, param_rows, uattr_rows, sattr_rows = [], [], [], []
            for w, row in zip(written, rows):
                for objective, v in enumerate(row.values):
                    stored, vtype = value_to_stored(float(v))
                    value_rows.append({"trial_id": w.trial_id, "objective": objective, "value": stored,
                                       "value_type": vtype})
                if row.params:
                    param_rows.extend({"trial_id": w.trial_id, "param_name": name, "param_value": float(v),
                                       "distribution_json": distribution_json[name]}
                                      for name, v in row.params.items())
                uattr_rows.extend({"trial_id": w.trial_id, "key": k, "value_json": json.dumps(v)}
                                  for k, v in row.user_attrs.items())
                sattr_rows.extend({"trial_id": w.trial_id, "key": k, "value_json": json.dumps(v)}
                                  for k, v in row.system_attrs.items())
            conn.execute(values_t.insert(), value_rows)
            for table, data in ((params_t, param_rows), (uattrs_t, uattr_rows), (sattrs_t, sattr_rows)):
                if data:
                    conn.execute(table.insert(), data)
        if study_system_attrs:
            present = set(conn.execute(select(ssattrs_t.c.key).where(
                ssattrs_t.c.study_id == study_id, ssattrs_t.c.key.in_(list(study_system_attrs)))).scalars())
            new = [{"study_id": study_id, "key": k, "value_json": json.dumps(v)}
                   for k, v in study_system_attrs.items() if k not in present]
            if new:
                conn.execute(ssattrs_t.insert(), new)
    return written


# -- column-wise reads ----------------------------------------------------------------------------

@dataclass
class TrialTable:
    """The trials of a study as columns (only what the search needs; no FrozenTrial per trial)."""

    trial_id: list[int] = field(default_factory=list)
    number: list[int] = field(default_factory=list)
    state: list[str] = field(default_factory=list)
    values: list[tuple[float, ...] | None] = field(default_factory=list)
    generation: list[int | None] = field(default_factory=list)
    genome: list[str | None] = field(default_factory=list)  # the GENOME_ATTR string, or None
    constraints: list[dict[str, float]] = field(default_factory=list)
    user_attrs: list[dict[str, Any]] = field(default_factory=list)
    has_params: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.trial_id)


def read_trials(storage, study_id: int, with_params_for_missing_genome: Iterable[str] | None = None,
                user_attr_keys: Iterable[str] = (GENOME_ATTR,)) -> TrialTable:
    """Read every trial of the study column-wise. Trials without the compact genome attribute (added
    by plain Optuna, say) get it rebuilt from their params when ``with_params_for_missing_genome``
    lists the gene names in order."""
    from optuna.distributions import json_to_distribution

    m = rdb_models()
    trials = m.TrialModel.__table__
    values_t = m.TrialValueModel.__table__
    uattrs_t = m.TrialUserAttributeModel.__table__
    sattrs_t = m.TrialSystemAttributeModel.__table__
    params_t = m.TrialParamModel.__table__
    table = TrialTable()
    keys = list(user_attr_keys)
    with storage.engine.connect() as conn:
        rows = conn.execute(select(trials.c.trial_id, trials.c.number, trials.c.state)
                            .where(trials.c.study_id == study_id).order_by(trials.c.trial_id)).all()
        index = {}
        for tid, number, state in rows:
            index[tid] = len(table.trial_id)
            table.trial_id.append(int(tid))
            table.number.append(int(number) if number is not None else -1)
            table.state.append(state.name if hasattr(state, "name") else str(state))
            table.values.append(None)
            table.generation.append(None)
            table.genome.append(None)
            table.constraints.append({})
            table.user_attrs.append({})
            table.has_params.append(False)
        if not rows:
            return table
        # Each SELECT below may see trials another writer committed after the first one (READ COMMITTED
        # on PostgreSQL, one snapshot per statement on SQLite): rows of trials not in ``index`` are
        # skipped. Trials are only ever written whole (one transaction), so indexed ones are complete.
        in_study = select(trials.c.trial_id).where(trials.c.study_id == study_id)
        vals: dict[int, dict[int, float]] = {}
        for tid, objective, value, vtype in conn.execute(
                select(values_t.c.trial_id, values_t.c.objective, values_t.c.value, values_t.c.value_type)
                .where(values_t.c.trial_id.in_(in_study))):
            vals.setdefault(tid, {})[objective] = stored_to_value(value, vtype)
        for tid, d in vals.items():
            if tid in index:
                table.values[index[tid]] = tuple(d[k] for k in sorted(d))
        for tid, key, value_json in conn.execute(
                select(sattrs_t.c.trial_id, sattrs_t.c.key, sattrs_t.c.value_json)
                .where(sattrs_t.c.trial_id.in_(in_study))
                .where((sattrs_t.c.key == nsga_keys()[0]) | sattrs_t.c.key.startswith(CONSTRAINT_PREFIX)
                       | (sattrs_t.c.key == "constraints"))):
            i = index.get(tid)
            if i is None:  # committed by another writer after the first SELECT
                continue
            value = json.loads(value_json)
            if key == nsga_keys()[0]:
                table.generation[i] = int(value)
            elif key == "constraints":  # Optuna's older list format
                if value is not None:
                    table.constraints[i].update({str(j): float(c) for j, c in enumerate(value)})
            else:
                table.constraints[i][key[len(CONSTRAINT_PREFIX):]] = float(value)
        if keys:
            for tid, key, value_json in conn.execute(
                    select(uattrs_t.c.trial_id, uattrs_t.c.key, uattrs_t.c.value_json)
                    .where(uattrs_t.c.trial_id.in_(in_study)).where(uattrs_t.c.key.in_(keys))):
                i = index.get(tid)
                if i is None:
                    continue
                value = json.loads(value_json)
                table.user_attrs[i][key] = value
                if key == GENOME_ATTR and isinstance(value, str):
                    table.genome[i] = value
        with_params = set(conn.execute(select(params_t.c.trial_id).where(params_t.c.trial_id.in_(in_study))
                                       .distinct()).scalars())
        for tid in with_params & index.keys():
            table.has_params[index[tid]] = True
        gene_names = list(with_params_for_missing_genome or [])
        missing = [table.trial_id[i] for i in range(len(table)) if table.genome[i] is None and table.has_params[i]]
        if gene_names and missing:
            params: dict[int, dict[str, Any]] = {}
            dist_cache: dict[str, Any] = {}
            for start in range(0, len(missing), 500):
                for tid, name, pvalue, djson in conn.execute(
                        select(params_t.c.trial_id, params_t.c.param_name, params_t.c.param_value,
                               params_t.c.distribution_json)
                        .where(params_t.c.trial_id.in_(missing[start:start + 500]))):
                    dist = dist_cache.get(djson) or dist_cache.setdefault(djson, json_to_distribution(djson))
                    params.setdefault(tid, {})[name] = dist.to_external_repr(pvalue)
            for tid, p in params.items():
                if all(n in p for n in gene_names):
                    table.genome[index[tid]] = ",".join(str(p[n]) for n in gene_names)
    return table


def study_system_attr(storage, study_id: int, key: str) -> Any:
    m = rdb_models()
    t = m.StudySystemAttributeModel.__table__
    with storage.engine.connect() as conn:
        row = conn.execute(select(t.c.value_json).where(t.c.study_id == study_id, t.c.key == key)).first()
    return json.loads(row[0]) if row else None


def study_version(storage, study_id: int) -> tuple:
    """Changes whenever a trial is added or finished or a study attribute is set (a cheap cache key)."""
    from optuna.trial import TrialState

    m = rdb_models()
    t = m.TrialModel.__table__
    ssa, sua = m.StudySystemAttributeModel.__table__, m.StudyUserAttributeModel.__table__
    with storage.engine.connect() as conn:
        trials = conn.execute(select(func.count(t.c.trial_id), func.max(t.c.trial_id), func.max(t.c.datetime_complete))
                              .where(t.c.study_id == study_id)).one()
        running = conn.execute(select(func.count(t.c.trial_id)).where(t.c.study_id == study_id,
                                                                      t.c.state != TrialState.COMPLETE)).scalar_one()
        attrs = [conn.execute(select(func.count(a.c.key), func.max(a.c[pk])).where(a.c.study_id == study_id)).one()
                 for a, pk in ((ssa, "study_system_attribute_id"), (sua, "study_user_attribute_id"))]
    return (tuple(trials), running, tuple(map(tuple, attrs)))


def trial_counts(storage) -> dict[int, dict[str, Any]]:
    """Per study id: trials by state and the time of the last finished trial."""
    m = rdb_models()
    trials = m.TrialModel.__table__
    out: dict[int, dict[str, Any]] = {}
    with storage.engine.connect() as conn:
        for sid, state, n, last in conn.execute(
                select(trials.c.study_id, trials.c.state, func.count(trials.c.trial_id),
                       func.max(trials.c.datetime_complete)).group_by(trials.c.study_id, trials.c.state)):
            entry = out.setdefault(int(sid), {"states": {}, "last": None})
            entry["states"][state.name if hasattr(state, "name") else str(state)] = int(n)
            if last is not None and (entry["last"] is None or last > entry["last"]):
                entry["last"] = last
    return out


def delete_study_rows(storage, study_id: int) -> None:
    """Delete a study and everything under it in one transaction, with set-based DELETEs (Optuna's
    ORM cascade loads every parameter row first, which takes minutes on a million of them)."""
    m = rdb_models()
    metadata = m.BaseModel.metadata
    trials = m.TrialModel.__table__
    studies = m.StudyModel.__table__
    in_study = select(trials.c.trial_id).where(trials.c.study_id == study_id)
    with storage.engine.begin() as conn:
        for table in reversed(metadata.sorted_tables):
            if table is trials or table is studies:
                continue
            if "trial_id" in table.c:
                conn.execute(table.delete().where(table.c.trial_id.in_(in_study)))
        conn.execute(trials.delete().where(trials.c.study_id == study_id))
        for table in reversed(metadata.sorted_tables):
            if table is not trials and table is not studies and "study_id" in table.c and "trial_id" not in table.c:
                conn.execute(table.delete().where(table.c.study_id == study_id))
        conn.execute(studies.delete().where(studies.c.study_id == study_id))


def utc_to_local(dt: datetime | None) -> datetime | None:
    if dt is None:
        return None
    return dt.replace(tzinfo=timezone.utc).astimezone().replace(tzinfo=None)


__all__ = ["insert_trials", "read_trials", "TrialRow", "TrialTable", "set_study_json", "get_study_json",
           "delete_study_rows", "trial_counts", "study_system_attr", "storage_error", "GENOME_ATTR",
           "CONSTRAINT_PREFIX", "now_utc", "fast_read_storage", "create_study_rows", "set_study_user_attrs",
           "json_chunks", "study_version", "utc_to_local"]
