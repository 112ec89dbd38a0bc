"""Hypervolume of a 2-objective front (both minimised), and the normalisation used to compare fronts.

Optuna 5 has no public hypervolume function; ``optuna._hypervolume.compute_hypervolume`` is private
(reached through :mod:`storage.optuna_adapter`), and a 2-D sweep (sort by the first objective, sum the
rectangles) stands in when it is missing or fails.
Fronts are compared in a box normalised by the *exact* front's ideal and nadir points, with the
reference point at 1.1 x the nadir in both objectives, so the ratio NSGA-II / exact does not depend on
units (bytes vs nats).
"""

from __future__ import annotations

import numpy as np

REFERENCE = 1.1  # reference point in normalised coordinates (nadir = 1, ideal = 0)

from storage.optuna_adapter import compute_hypervolume

_optuna_hv = compute_hypervolume()


def sweep_2d(points: np.ndarray, reference: np.ndarray) -> float:
    """Area dominated by ``points`` (n, 2) and bounded by ``reference``; both objectives minimised."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    ref = np.asarray(reference, dtype=np.float64)
    pts = pts[np.all(pts <= ref, axis=1)]
    if len(pts) == 0:
        return 0.0
    pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]
    area, best_y = 0.0, ref[1]
    for x, y in pts:
        if y < best_y:
            area += (ref[0] - x) * (best_y - y)
            best_y = y
    return float(area)


def hypervolume_2d(points: np.ndarray, reference: np.ndarray) -> float:
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    ref = np.asarray(reference, dtype=np.float64)
    pts = pts[np.all(pts <= ref, axis=1)]
    if len(pts) == 0:
        return 0.0
    if _optuna_hv is not None:
        try:
            return float(_optuna_hv(pts, ref))
        except Exception:  # noqa: BLE001 - a changed private API: fall back
            pass
    return sweep_2d(pts, ref)


class FrontScale:
    """Normalisation box from a reference front: (loss, memory) -> [0, 1]^2 (ideal 0, nadir 1)."""

    def __init__(self, loss: np.ndarray, memory: np.ndarray):
        loss = np.asarray(loss, dtype=np.float64)
        memory = np.asarray(memory, dtype=np.float64)
        self.low = np.array([loss.min(), memory.min()])
        high = np.array([loss.max(), memory.max()])
        span = high - self.low
        self.span = np.where(span > 0, span, 1.0)
        self.reference = np.full(2, REFERENCE)

    def normalise(self, loss, memory) -> np.ndarray:
        pts = np.column_stack([np.asarray(loss, dtype=np.float64), np.asarray(memory, dtype=np.float64)])
        return (pts - self.low) / self.span

    def hypervolume(self, loss, memory) -> float:
        if len(np.atleast_1d(loss)) == 0:
            return 0.0
        return hypervolume_2d(self.normalise(loss, memory), self.reference)
