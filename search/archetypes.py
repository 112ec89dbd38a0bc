"""Archetypes: the few genomes of a Pareto front a user actually deploys.

Pure functions over arrays of (memory bytes, loss in nats) of the front's points; nothing here touches
a model or a database, so the same code serves the CLI, the TUI and the tests.

- **max-accuracy**: the lowest loss (ties: less memory).
- **balanced**: the knee of the usable front (PPL rise within the max-compression cap), the point
  farthest from the straight line joining the two extremes of that part of the
  front (lowest memory, lowest loss) once both objectives are scaled to [0, 1].
- **max-compression**: the lowest memory whose perplexity rise ``exp(loss - base_loss) - 1`` stays
  under a cap (default 25%).
- user picks: :func:`best_under_memory` ("best accuracy under N MiB") and
  :func:`smallest_under_ppl_rise` ("smallest under X% PPL rise"); :func:`select_archetypes` also
  applies either budget to every archetype (``--max-mib`` / ``--max-ppl-rise``).

**Predicted or measured.** Every point has a predicted loss (the additive proxy); some also carry a
measured one (a search run in measured mode, or a validation). :func:`effective_objectives` decides
which number each point is judged on. The default basis, ``"auto"``, lets measured values decide
whenever any candidate has one and then compares only measured points: mixing the two per point would
let an unmeasured point win just because the proxy (which ignores interactions between layers, and
usually under-estimates a mixed genome's loss) flatters it. ``"mixed"`` is the per-point rule (measured
where present, else predicted) and ``"predicted"`` ignores measurements. Every result says which basis
decided it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .pareto import non_dominated

MIB = 1024 * 1024
ARCHETYPES = ("max-accuracy", "balanced", "max-compression")
DEFAULT_PPL_RISE_CAP = 0.25
BASES = ("auto", "mixed", "predicted")


class ArchetypeError(ValueError):
    """No point satisfies the request; the message names the best that is achievable."""


@dataclass(frozen=True)
class Choice:
    """One selected point: ``index`` into the arrays the caller passed."""

    archetype: str
    index: int
    memory_bytes: int
    loss: float  # on the basis below, in nats (base_loss + the measured/predicted rise)
    basis: str  # "predicted" or "measured"
    ppl_rise: float  # exp(loss - base_loss) - 1, a fraction (0.25 = 25%)
    rule: str  # human-readable selection rule, e.g. "knee of the front"

    @property
    def memory_mib(self) -> float:
        return self.memory_bytes / MIB


def ppl_rise(loss, base_loss: float):
    """Relative perplexity rise over dense: exp(loss - base_loss) - 1 (0.25 = 25% higher PPL)."""
    return np.expm1(np.asarray(loss, dtype=np.float64) - base_loss)


def _as_arrays(memory, loss) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(memory, dtype=np.float64).reshape(-1)
    l = np.asarray(loss, dtype=np.float64).reshape(-1)
    if m.shape != l.shape:
        raise ValueError(f"memory ({m.size}) and loss ({l.size}) must have one value per point")
    if m.size == 0:
        raise ArchetypeError("the front is empty: run a search first (or check the study name)")
    return m, l


def _valid(m: np.ndarray, l: np.ndarray) -> np.ndarray:
    return np.isfinite(m) & np.isfinite(l)


def max_accuracy(memory, loss) -> int:
    """Index of the lowest loss (ties broken by less memory)."""
    m, l = _as_arrays(memory, loss)
    ok = np.flatnonzero(_valid(m, l))
    if ok.size == 0:
        raise ArchetypeError("no point has a finite loss and memory")
    return int(ok[np.lexsort((m[ok], l[ok]))[0]])


def knee(memory, loss) -> int:
    """Index of the knee: the non-dominated point farthest below the line joining the extremes.

    Both objectives are scaled to [0, 1] over the non-dominated points, so the line runs from
    (0, 1) (smallest model, highest loss) to (1, 0) (largest, lowest loss) and a point's distance
    below it is (1 - x - y) / sqrt(2). With fewer than three points, or a flat objective, there is
    no knee: the lowest-loss point is returned (and, with one point, that point).
    """
    m, l = _as_arrays(memory, loss)
    front = non_dominated(np.where(_valid(m, l), m, np.nan), l)
    if front.size == 0:
        raise ArchetypeError("no point has a finite loss and memory")
    fm, fl = m[front], l[front]
    m_span, l_span = fm.max() - fm.min(), fl.max() - fl.min()
    if front.size < 3 or m_span <= 0 or l_span <= 0:
        return max_accuracy(m, l)
    x = (fm - fm.min()) / m_span
    y = (fl - fl.min()) / l_span
    distance = (1.0 - x - y) / math.sqrt(2.0)
    # argmax returns the first maximum: on a tie, the smaller model (front is memory-ascending).
    order = np.argsort(fm, kind="stable")
    return int(front[order[int(np.argmax(distance[order]))]])


def best_under_memory(memory, loss, max_bytes: float) -> int:
    """Index of the lowest loss among points with memory <= ``max_bytes``."""
    m, l = _as_arrays(memory, loss)
    ok = _valid(m, l)
    fits = ok & (m <= max_bytes)
    if not fits.any():
        smallest = m[ok].min() if ok.any() else float("nan")
        raise ArchetypeError(f"no point fits {max_bytes / MIB:.1f} MiB: the smallest achievable is "
                             f"{smallest / MIB:.1f} MiB; raise --max-mib")
    idx = np.flatnonzero(fits)
    return int(idx[np.lexsort((m[idx], l[idx]))[0]])


def smallest_under_ppl_rise(memory, loss, base_loss: float, max_rise: float) -> int:
    """Index of the lowest memory among points whose PPL rise is <= ``max_rise`` (0.25 = 25%)."""
    m, l = _as_arrays(memory, loss)
    if not (max_rise >= 0 and math.isfinite(max_rise)):
        raise ValueError(f"PPL rise cap {max_rise!r} must be a finite number >= 0")
    ok = _valid(m, l)
    rise = ppl_rise(l, base_loss)
    fits = ok & (rise <= max_rise + 1e-12)
    if not fits.any():
        if not ok.any():
            raise ArchetypeError("no point has a finite loss and memory")
        best = int(np.flatnonzero(ok)[np.argmin(l[ok])])
        raise ArchetypeError(f"no point stays under {100 * max_rise:.1f}% PPL rise: the lowest achievable is "
                             f"{100 * rise[best]:.1f}% (at {m[best] / MIB:.1f} MiB); raise --max-ppl-rise")
    idx = np.flatnonzero(fits)
    return int(idx[np.lexsort((l[idx], m[idx]))[0]])


def max_compression(memory, loss, base_loss: float, cap: float = DEFAULT_PPL_RISE_CAP) -> int:
    """The smallest point whose PPL rise stays under ``cap`` (default 25%)."""
    return smallest_under_ppl_rise(memory, loss, base_loss, cap)


# -- predicted vs measured --------------------------------------------------------------------------

def effective_objectives(predicted_loss, measured_loss=None, basis: str = "auto",
                         candidates: np.ndarray | None = None) -> tuple[np.ndarray, str]:
    """(loss per point, basis used). Points not judged on that basis get NaN (they never win).

    ``measured_loss`` has NaN where a point was not measured; it must be on the same scale as the
    prediction (base_loss + rise, see :func:`measured_as_loss`). ``candidates`` (a boolean mask) is the
    set the decision is made over: under ``"auto"`` measured values decide if any candidate has one.
    """
    if basis not in BASES:
        raise ValueError(f"basis {basis!r} is not one of {', '.join(BASES)}")
    pred = np.asarray(predicted_loss, dtype=np.float64).reshape(-1)
    if measured_loss is None or basis == "predicted":
        return pred.copy(), "predicted"
    meas = np.asarray(measured_loss, dtype=np.float64).reshape(-1)
    if meas.shape != pred.shape:
        raise ValueError("measured_loss must have one value (or NaN) per point")
    has = np.isfinite(meas)
    if candidates is not None:
        has = has & np.asarray(candidates, dtype=bool)
    if not has.any():
        return pred.copy(), "predicted"
    if basis == "mixed":
        return np.where(np.isfinite(meas), meas, pred), "measured"
    return np.where(np.isfinite(meas), meas, np.nan), "measured"


def measured_as_loss(measured: dict | None, base_loss: float) -> float:
    """A point's measured values as a loss on the proxy's scale (base_loss + rise), NaN if none.

    Accepted keys, in order of preference: ``kl`` (mean KL to dense, nats/token: the quantity the
    proxy predicts), or ``loss`` with ``base_loss`` (the dense loss measured on the same tokens).
    """
    if not measured:
        return float("nan")
    kl = measured.get("kl")
    if _finite(kl):
        return base_loss + float(kl)
    loss, base = measured.get("loss"), measured.get("base_loss")
    if _finite(loss) and _finite(base):
        return base_loss + float(loss) - float(base)
    return float("nan")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


# -- all at once ----------------------------------------------------------------------------------

def select_archetypes(memory, predicted_loss, base_loss: float, archetypes=ARCHETYPES,
                      measured_loss=None, max_bytes: float | None = None, max_ppl_rise: float | None = None,
                      basis: str = "auto", skipped: dict[str, str] | None = None) -> list[Choice]:
    """Choose each named archetype from a front, honouring optional budgets.

    ``max_bytes`` and ``max_ppl_rise`` restrict every archetype to points within them ("best accuracy
    under N MiB" is max-accuracy with ``max_bytes``); ``max_ppl_rise`` is also max-compression's cap
    (default 25%). Raises :class:`ArchetypeError` (one line, naming what is achievable) when a budget
    leaves nothing. With ``skipped`` (a dict), an archetype that cannot be met inside budgets that do
    leave points (max-compression's cap under a tight --max-mib) is recorded there with its reason and
    the others are still chosen. Decisions about all archetypes are made before the caller writes.
    """
    m = np.asarray(memory, dtype=np.float64).reshape(-1)
    pred = np.asarray(predicted_loss, dtype=np.float64).reshape(-1)
    _as_arrays(m, pred)
    unknown = [a for a in archetypes if a not in ARCHETYPES]
    if unknown:
        raise ValueError(f"unknown archetype {unknown[0]!r}: choose from {', '.join(ARCHETYPES)}")
    cap = DEFAULT_PPL_RISE_CAP if max_ppl_rise is None else float(max_ppl_rise)
    if not (cap >= 0 and math.isfinite(cap)):
        raise ValueError(f"--max-ppl-rise {max_ppl_rise!r} must be a finite percentage >= 0")
    if max_bytes is not None and not (max_bytes > 0 and math.isfinite(max_bytes)):
        raise ValueError(f"memory budget {max_bytes!r} must be a positive number")

    # Which basis: measured values decide if any point inside the memory budget has one.
    in_budget = np.ones(m.size, dtype=bool) if max_bytes is None else (m <= max_bytes)
    loss, used = effective_objectives(pred, measured_loss, basis, candidates=in_budget)
    # Budgets first (their errors name what is achievable on the same basis).
    allowed = _valid(m, loss)
    if max_bytes is not None:
        best_under_memory(np.where(allowed, m, np.nan), loss, max_bytes)  # raises if nothing fits
        allowed &= m <= max_bytes
    if max_ppl_rise is not None:
        smallest_under_ppl_rise(np.where(allowed, m, np.nan), loss, base_loss, cap)
        allowed &= ppl_rise(loss, base_loss) <= cap + 1e-12
    lm = np.where(allowed, m, np.nan)
    budget_text = _budget_text(max_bytes, max_ppl_rise)

    choices = []
    for name in archetypes:
        try:
            choices.append(_choose(name, m, loss, lm, allowed, base_loss, cap, used, budget_text))
        except ArchetypeError as exc:
            if skipped is None:
                raise
            skipped[name] = str(exc)
    return choices


def _choose(name, m, loss, lm, allowed, base_loss, cap, used, budget_text) -> Choice:
    if name == "max-accuracy":
        i, rule = max_accuracy(lm, loss), "lowest loss"
    elif name == "balanced":
        # The knee of the *usable* part of the front: points past the PPL-rise cap (ruined 2-bit
        # genomes) would otherwise drag the knee below max-compression's memory.
        usable = allowed & (ppl_rise(loss, base_loss) <= cap + 1e-12)
        within = np.where(usable, m, np.nan) if usable.any() else lm
        i = knee(within, loss)
        rule = (f"knee of the front within PPL rise <= {100 * cap:g}% "
                "(normalised distance from the extremes' line)")
    else:
        i = smallest_under_ppl_rise(lm, loss, base_loss, cap)
        rule = f"lowest memory with PPL rise <= {100 * cap:g}%"
    return Choice(archetype=name, index=i, memory_bytes=int(m[i]), loss=float(loss[i]), basis=used,
                  ppl_rise=float(ppl_rise(loss[i], base_loss)), rule=rule + budget_text)


def _budget_text(max_bytes, max_ppl_rise) -> str:
    parts = []
    if max_bytes is not None:
        parts.append(f"memory <= {max_bytes / MIB:g} MiB")
    if max_ppl_rise is not None:
        parts.append(f"PPL rise <= {100 * max_ppl_rise:g}%")
    return f" (within {', '.join(parts)})" if parts else ""


# -- from a study's front to artifacts -----------------------------------------------------------------

def front_arrays(points, base_loss: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(memory bytes, predicted loss, measured loss or NaN) of front points.

    ``points`` are anything with ``memory_bytes``, ``predicted_loss`` and ``measured`` (a dict or None),
    such as ``search.study.FrontPoint``.
    """
    memory = np.array([float(p.memory_bytes) for p in points], dtype=np.float64)
    predicted = np.array([float(p.predicted_loss) for p in points], dtype=np.float64)
    measured = np.array([measured_as_loss(getattr(p, "measured", None), base_loss) for p in points],
                        dtype=np.float64)
    return memory, predicted, measured


def predicted_metrics(profile, qtypes) -> dict:
    """The proxy's numbers for a genome, every one of them a prediction (calibration-based)."""
    loss = profile.predicted_loss(qtypes)
    return {"loss": loss, "ppl": math.exp(loss), "kl": loss - profile.base_loss,
            "ppl_rise_pct": 100.0 * math.expm1(loss - profile.base_loss),
            "dense_loss": profile.base_loss, "dense_ppl": math.exp(profile.base_loss),
            "average_bits": profile.average_bits(qtypes), "memory_bytes": profile.memory_bytes(qtypes),
            "memory_mib": profile.memory_bytes(qtypes) / MIB, "memory_basis": profile.memory_basis,
            "on": f"{profile.calibration_tokens} calibration tokens ({profile.metric} profile, additive proxy)"}


def make_artifact(choice: Choice, point, profile, source: dict, heldout: dict | None = None):
    """The JSON artifact of one chosen front point (see :mod:`storage.artifacts`)."""
    from storage.artifacts import Artifact, finite_or_none

    qtypes = [str(q) for q in point.qtypes]
    if len(qtypes) != profile.n_genes:
        raise ValueError(f"trial {getattr(point, 'trial_number', '?')} has {len(qtypes)} genes, "
                         f"the profile {profile.n_genes}: the study is inconsistent")
    measured = {}
    search_measured = getattr(point, "measured", None)
    if search_measured:
        # "search": the study's measured mode; "calibration": the export's refinement (both on calibration text)
        where = "calibration" if search_measured.get("on") == "calibration" else "search"
        measured[where] = {str(k): (v if isinstance(v, str) else finite_or_none(v))
                           for k, v in search_measured.items() if isinstance(v, (int, float, str))}
    if heldout:
        measured["heldout"] = heldout
    metrics = {"predicted": {k: (v if isinstance(v, str) else finite_or_none(v))
                             for k, v in predicted_metrics(profile, qtypes).items()}}
    if measured:
        metrics["measured"] = measured
    return Artifact(
        archetype=choice.archetype, model_id=profile.model_id, model_fingerprint=profile.model_fingerprint,
        quantizer=dict(profile.quantizer), granularity=profile.granularity,
        genes=dict(zip(profile.gene_names, qtypes)), memory_bytes=int(profile.memory_bytes(qtypes)),
        metrics=metrics,
        selection={"rule": choice.rule, "basis": choice.basis, "loss": finite_or_none(choice.loss),
                   "ppl_rise_pct": finite_or_none(100.0 * choice.ppl_rise)},
        source={**source, "trial": getattr(point, "trial_number", None),
                "calibration": {"corpus": profile.corpus_source, "corpus_fingerprint": profile.corpus_fingerprint,
                                "tokens": profile.calibration_tokens}})
