import itertools

import numpy as np
import pytest

from search.exact_front import exact_front


def brute_force_front(cost, sens):
    n, k = cost.shape
    points = []
    for g in itertools.product(range(k), repeat=n):
        idx = np.array(g)
        points.append((int(cost[np.arange(n), idx].sum()), float(sens[np.arange(n), idx].sum())))
    front = sorted({p for p in points if not any((q[0] <= p[0] and q[1] <= p[1] and q != p) for q in points)})
    return front


@pytest.mark.parametrize("seed", range(12))
def test_exact_front_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, k = rng.integers(2, 6), rng.integers(2, 5)
    cost = np.sort(rng.integers(1, 60, size=(n, k)), axis=1)
    sens = np.sort(rng.random((n, k)), axis=1)[:, ::-1].copy()
    if seed % 3 == 0:  # unsorted, arbitrary tables too
        cost = rng.integers(1, 60, size=(n, k))
        sens = rng.random((n, k))
    f = exact_front(cost, sens)
    got = list(zip(f.memory.tolist(), f.loss.tolist()))
    want = brute_force_front(cost, sens)
    assert [m for m, _ in got] == [m for m, _ in want]
    np.testing.assert_allclose([l for _, l in got], [l for _, l in want])
    # the recovered genomes really have those objective values
    for genome, m, l in zip(f.genomes, f.memory, f.loss):
        assert cost[np.arange(n), genome].sum() == m
        assert sens[np.arange(n), genome].sum() == pytest.approx(l)


def test_front_is_monotone_and_spans_extremes():
    rng = np.random.default_rng(1)
    cost = np.sort(rng.integers(100, 10_000, size=(40, 4)), axis=1)
    sens = np.sort(rng.random((40, 4)), axis=1)[:, ::-1].copy()
    f = exact_front(cost, sens)
    assert np.all(np.diff(f.memory) > 0) and np.all(np.diff(f.loss) < 0)
    assert f.memory[0] == cost.min(axis=1).sum()
    assert f.loss[-1] == pytest.approx(sens.min(axis=1).sum())
