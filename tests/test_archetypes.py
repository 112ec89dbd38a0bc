"""Archetype selection on synthetic fronts: knee, caps, budgets, predicted vs measured, errors."""

import math
from types import SimpleNamespace

import numpy as np
import pytest

from search.archetypes import (MIB, ArchetypeError, best_under_memory, effective_objectives, front_arrays,
                               knee, max_accuracy, max_compression, measured_as_loss, ppl_rise, select_archetypes,
                               smallest_under_ppl_rise)
from search.pareto import front_mask

BASE = 3.0


def convex_front():
    """A front with an unmistakable knee at index 2 (memory 3 MiB)."""
    memory = np.array([1, 2, 3, 6, 10], dtype=float) * MIB
    loss = BASE + np.array([2.0, 0.8, 0.1, 0.05, 0.0])
    return memory, loss


def test_max_accuracy_lowest_loss_ties_to_less_memory():
    m = np.array([5, 3, 4.0])
    l = np.array([1.0, 1.0, 2.0])
    assert max_accuracy(m, l) == 1


def test_knee_is_farthest_from_extremes_line():
    m, l = convex_front()
    assert knee(m, l) == 2
    # scale invariance: the objectives are normalised
    assert knee(m * 1000, BASE + (l - BASE) * 1e-3) == 2
    # order of the points does not matter
    perm = np.array([4, 0, 3, 2, 1])
    assert perm[knee(m[perm], l[perm])] == 2


def test_knee_ignores_dominated_points_and_degenerate_fronts():
    m, l = convex_front()
    # a dominated point far below the line in raw terms must not be chosen
    m2 = np.append(m, 3.5 * MIB)
    l2 = np.append(l, BASE + 0.2)
    assert knee(m2, l2) == 2
    assert knee(m[:1], l[:1]) == 0
    assert knee(m[:2], l[:2]) == 1  # two points: no knee, lowest loss
    assert knee(np.array([1.0, 1.0, 1.0]), np.array([3.0, 2.0, 1.0])) == 2


def test_knee_exact_on_analytic_front():
    # loss = 1/x on x in [1, 10]: the farthest point from the chord after normalisation
    x = np.linspace(1, 10, 9001)
    y = 1 / x
    xn, yn = (x - 1) / 9, (y - 0.1) / 0.9
    expected = int(np.argmax(1 - xn - yn))
    assert knee(x, y) == expected
    assert x[expected] == pytest.approx(math.sqrt(10), abs=1e-2)


def test_max_compression_cap_and_error():
    m, l = convex_front()
    # rises: e^2-1=639%, e^0.8-1=122%, 10.5%, 5.1%, 0
    assert max_compression(m, l, BASE) == 2
    assert max_compression(m, l, BASE, cap=1.5) == 1
    assert max_compression(m, l, BASE, cap=0.0) == 4
    assert smallest_under_ppl_rise(m, l, BASE, 0.06) == 3
    with pytest.raises(ArchetypeError, match=r"lowest achievable is 5\.1% \(at 6\.0 MiB\)"):
        smallest_under_ppl_rise(m[:4], l[:4], BASE, 0.01)
    with pytest.raises(ValueError):
        smallest_under_ppl_rise(m, l, BASE, -1)


def test_best_under_memory_budget_and_error():
    m, l = convex_front()
    assert best_under_memory(m, l, 6 * MIB) == 3
    assert best_under_memory(m, l, 5.99 * MIB) == 2
    with pytest.raises(ArchetypeError) as err:
        best_under_memory(m, l, 0.5 * MIB)
    assert "smallest achievable is 1.0 MiB" in str(err.value) and "\n" not in str(err.value)


def test_select_archetypes_all_with_budgets():
    m, l = convex_front()
    choices = {c.archetype: c for c in select_archetypes(m, l, BASE)}
    # balanced is the knee of the usable part (PPL rise <= 25%: points 2, 3, 4), never smaller than
    # max-compression (the knee of the whole front would be point 2, whose rise is at the cap's edge)
    assert choices["max-accuracy"].index == 4 and choices["balanced"].index == 3
    assert choices["max-compression"].index == 2
    assert choices["max-compression"].memory_bytes <= choices["balanced"].memory_bytes
    assert all(c.basis == "predicted" for c in choices.values())
    assert choices["max-compression"].ppl_rise == pytest.approx(math.expm1(0.1))
    # budgets restrict every archetype
    within = {c.archetype: c for c in select_archetypes(m, l, BASE, max_bytes=3 * MIB)}
    assert within["max-accuracy"].index == 2 and "3 MiB" in within["max-accuracy"].rule
    capped = {c.archetype: c for c in select_archetypes(m, l, BASE, max_ppl_rise=1.5)}
    assert capped["max-compression"].index == 1
    with pytest.raises(ArchetypeError, match="smallest achievable"):
        select_archetypes(m, l, BASE, max_bytes=0.1 * MIB)
    with pytest.raises(ArchetypeError, match="PPL rise"):
        select_archetypes(m, l, BASE, max_bytes=2 * MIB, max_ppl_rise=0.5)
    with pytest.raises(ValueError, match="unknown archetype"):
        select_archetypes(m, l, BASE, archetypes=["fastest"])
    with pytest.raises(ArchetypeError, match="empty"):
        select_archetypes([], [], BASE)


def test_select_archetypes_skips_what_a_tight_budget_rules_out():
    """Under 2 MiB only points 0 and 1 fit (PPL rise 639% and 123%): max-compression's 25% cap cannot be
    met there, so with ``skipped`` it is recorded with its reason and the other two are still chosen."""
    m, l = convex_front()
    skipped = {}
    choices = select_archetypes(m, l, BASE, max_bytes=2 * MIB, skipped=skipped)
    assert [c.archetype for c in choices] == ["max-accuracy", "balanced"]
    assert all(c.index == 1 for c in choices)  # two points: no knee, the lowest loss
    assert list(skipped) == ["max-compression"]
    assert "lowest achievable is 122.6% (at 2.0 MiB)" in skipped["max-compression"]
    assert "\n" not in skipped["max-compression"]
    # without ``skipped`` the same request is an error; a budget that leaves no point at all still is
    with pytest.raises(ArchetypeError, match="lowest achievable is 122.6%"):
        select_archetypes(m, l, BASE, max_bytes=2 * MIB)
    with pytest.raises(ArchetypeError, match="smallest achievable"):
        select_archetypes(m, l, BASE, max_bytes=0.1 * MIB, skipped={})


def test_measured_values_decide_and_are_labelled():
    m, l = convex_front()
    measured = np.full(len(m), np.nan)
    # the proxy is optimistic: measured says point 2 is much worse and point 3 only slightly worse
    measured[2], measured[3], measured[4] = BASE + 0.5, BASE + 0.06, BASE + 0.0
    choices = {c.archetype: c for c in select_archetypes(m, l, BASE, measured_loss=measured)}
    assert {c.basis for c in choices.values()} == {"measured"}
    assert choices["max-compression"].index == 3  # 2 is 65% measured: over the cap
    assert choices["max-compression"].loss == pytest.approx(BASE + 0.06)
    # "auto": unmeasured points do not compete with measured ones
    loss, basis = effective_objectives(l, measured)
    assert basis == "measured" and np.isnan(loss[0]) and loss[2] == BASE + 0.5
    # "mixed": per point, measured where present else predicted
    loss, basis = effective_objectives(l, measured, basis="mixed")
    assert loss[0] == l[0] and loss[2] == BASE + 0.5
    # "predicted" ignores measurements; no measurement at all is predicted
    assert effective_objectives(l, measured, basis="predicted")[1] == "predicted"
    assert effective_objectives(l, np.full(len(m), np.nan))[1] == "predicted"
    # a memory budget with no measured point inside falls back to predicted
    c = select_archetypes(m, l, BASE, ["max-accuracy"], measured_loss=measured, max_bytes=2 * MIB)[0]
    assert c.basis == "predicted" and c.index == 1


def test_measured_as_loss_and_front_arrays():
    assert measured_as_loss({"kl": 0.2}, BASE) == pytest.approx(BASE + 0.2)
    assert measured_as_loss({"loss": 4.5, "base_loss": 4.0}, BASE) == pytest.approx(BASE + 0.5)
    assert math.isnan(measured_as_loss(None, BASE)) and math.isnan(measured_as_loss({"kl": None}, BASE))
    assert math.isnan(measured_as_loss({"kl": float("nan")}, BASE))
    points = [SimpleNamespace(trial_number=0, qtypes=["4"], predicted_loss=3.5, memory_bytes=100, measured=None),
              SimpleNamespace(trial_number=1, qtypes=["8"], predicted_loss=3.1, memory_bytes=200,
                              measured={"kl": 0.2})]
    mem, pred, meas = front_arrays(points, BASE)
    assert mem.tolist() == [100, 200] and pred.tolist() == [3.5, 3.1]
    assert math.isnan(meas[0]) and meas[1] == pytest.approx(3.2)


def test_front_mask_and_ppl_rise():
    m = np.array([1, 2, 2, 3, 4.0, np.nan])
    l = np.array([5, 4, 6, 4, 1.0, 0.0])
    assert front_mask(m, l).tolist() == [True, True, False, False, True, False]
    # fronts are distinct points: an identical copy of a front point counts once (the first one)
    assert front_mask(np.append(m, 2.0), np.append(l, 4.0)).tolist() == [True, True, False, False, True, False,
                                                                          False]
    assert ppl_rise(BASE + math.log(1.25), BASE) == pytest.approx(0.25)


def test_archetypes_on_exact_front_of_a_random_space():
    """End to end without a study: the exact proxy front of a search space."""
    from search.exact_front import front_for_space
    from search.space import SearchSpace

    rng = np.random.default_rng(0)
    n, bits = 12, (2, 4, 8, 16)
    params = rng.integers(1000, 5000, size=n)
    cost = np.stack([params * b // 8 for b in bits], axis=1).astype(np.int64)
    sens = np.stack([rng.random(n) * s for s in (1.0, 0.1, 0.001, 0.0)], axis=1)
    space = SearchSpace(tuple(f"g{i}" for i in range(n)), tuple(str(b) for b in bits), np.array(bits, dtype=float),
                        cost, sens, params, 1000, BASE)
    front = front_for_space(space)
    choices = {c.archetype: c for c in select_archetypes(front.memory, front.loss, BASE)}
    acc, bal, comp = choices["max-accuracy"], choices["balanced"], choices["max-compression"]
    assert acc.index == len(front) - 1 and acc.loss == pytest.approx(BASE)
    assert comp.memory_bytes <= acc.memory_bytes and bal.memory_bytes <= acc.memory_bytes
    assert comp.ppl_rise <= 0.25
    # the smallest front point under the cap: the next smaller one is over it
    if comp.index > 0:
        assert ppl_rise(front.loss[comp.index - 1], BASE) > 0.25
    genome = front.genomes[bal.index]
    assert space.memory_bytes(genome) == bal.memory_bytes
