"""The one Pareto filter every part of EMPAS uses (search archive, fronts, archetypes, TUI, listings).

Both objectives are minimised. A point is on the front when no other point is at most as large in
both objectives and smaller in one. Identical points (two trials with the same genome, or two
genomes with the same memory and loss) count once: the first of them is the one kept, so every
screen and command reports the same number of front points for a study.
"""

from __future__ import annotations

import numpy as np


def non_dominated(memory, loss, keep_ties: bool = False) -> np.ndarray:
    """Indices of the distinct non-dominated points, memory ascending (NaN points never qualify).

    ``keep_ties`` keeps every copy of an identical point instead of the first: what Optuna's
    ``study.best_trials`` counts, so the search gives each of them its params (the dashboard shows
    every best trial's genes)."""
    m = np.asarray(memory, dtype=np.float64).reshape(-1)
    l = np.asarray(loss, dtype=np.float64).reshape(-1)
    if m.shape != l.shape:
        raise ValueError(f"memory ({m.size}) and loss ({l.size}) must have one value per point")
    ok = np.flatnonzero(~(np.isnan(m) | np.isnan(l)))
    if ok.size == 0:
        return np.zeros(0, dtype=np.int64)
    # Stable sort by memory, then loss: of identical points the one with the lowest index comes first.
    order = ok[np.lexsort((ok, l[ok], m[ok]))]
    ls = l[order]
    best_before = np.minimum.accumulate(np.concatenate([[np.inf], ls[:-1]]))
    keep = ls < best_before
    if keep_ties:
        ms = m[order]
        same_as_previous = np.concatenate([[False], (ms[1:] == ms[:-1]) & (ls[1:] == ls[:-1])])
        for k in np.flatnonzero(same_as_previous):  # a run of copies follows its kept first one
            keep[k] = keep[k - 1]
    return order[keep].astype(np.int64)


def front_mask(memory, loss) -> np.ndarray:
    """Boolean mask form of :func:`non_dominated`."""
    mask = np.zeros(np.asarray(memory).size, dtype=bool)
    mask[non_dominated(memory, loss)] = True
    return mask
