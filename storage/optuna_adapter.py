"""Every private part of Optuna that EMPAS touches, in one place.

EMPAS writes studies a generation per transaction straight into Optuna's RDB schema, drives
``NSGAIISampler`` on a small in-memory window study, and computes hypervolumes; each of these needs
something Optuna does not promise to keep. They are all reached through this module, nowhere else,
and ``tests/test_optuna_adapter.py`` checks each one against the installed Optuna, so an Optuna
release that changes one fails that test loudly instead of corrupting a study.

What is private here, and why it is used:

- ``optuna.storages._rdb.models``: the table definitions of Optuna's RDB schema (bulk inserts and
  column-wise reads; Optuna's own API commits once per parameter) and the value encoders of
  ``TrialValueModel`` / ``TrialIntermediateValueModel`` (infinities are stored specially);
- ``NSGAIISampler._GENERATION_KEY`` / ``_PARENT_CACHE_KEY_PREFIX``: the system-attribute names under
  which the sampler finds each trial's generation and each generation's parents;
- ``Study._storage`` / ``Study._study_id`` of an in-memory study and ``FrozenTrial._trial_id`` and
  its private dicts: the window study is filled directly (validated once by construction) and its
  trials copied shallowly;
- ``FrozenStudy._study_id``: to join ``get_all_studies`` with trial counts;
- ``optuna._hypervolume.compute_hypervolume`` (Optuna 5 has no public hypervolume function).
"""

from __future__ import annotations

import copy
from functools import lru_cache

#: What the installed Optuna must provide (checked by tests/test_optuna_adapter.py).
EXPECTED_NSGA_KEYS = ("NSGAIISampler:generation", "NSGAIISampler:parent:")


def rdb_models():
    """Optuna's SQLAlchemy table models (``optuna.storages._rdb.models``)."""
    from optuna.storages._rdb import models

    return models


def value_to_stored(value: float) -> tuple[float | None, object]:
    """How Optuna stores an objective value (finite values as they are, infinities as a type flag)."""
    return rdb_models().TrialValueModel.value_to_stored_repr(float(value))


def stored_to_value(value, value_type) -> float:
    return rdb_models().TrialValueModel.stored_repr_to_value(value, value_type)


def stored_to_intermediate(value, value_type) -> float:
    return rdb_models().TrialIntermediateValueModel.stored_repr_to_intermediate_value(value, value_type)


@lru_cache(maxsize=None)
def nsga_keys() -> tuple[str, str]:
    """(generation key, parent-cache key prefix) that ``NSGAIISampler`` reads."""
    from optuna.samplers import NSGAIISampler

    return NSGAIISampler._GENERATION_KEY, NSGAIISampler._PARENT_CACHE_KEY_PREFIX


def study_storage(study) -> tuple[object, int]:
    """(storage, study id) behind an ``optuna.Study``."""
    return study._storage, study._study_id


def frozen_study_id(frozen_study) -> int:
    return frozen_study._study_id


def trial_id(frozen_trial) -> int:
    return frozen_trial._trial_id


_WINDOW_TRIAL = None


def window_trial_class():
    """A ``FrozenTrial`` whose copies share nothing mutable but copy only shallowly. Optuna's in-memory
    storage deep-copies every trial it is given (a third of the run time at 210 genes); the window's
    trials are never modified after creation, so a copy of the dicts is enough."""
    global _WINDOW_TRIAL
    if _WINDOW_TRIAL is None:
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


def compute_hypervolume():
    """Optuna's hypervolume function, or None when this Optuna has none (callers fall back)."""
    try:
        from optuna._hypervolume import compute_hypervolume as hv
    except ImportError:
        return None
    return hv
