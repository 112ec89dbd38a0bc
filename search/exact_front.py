"""The exact Pareto front of the additive proxy.

Both objectives are sums over genes, so the Pareto front of (memory, predicted loss) is the answer of a
multiple-choice knapsack: sweep the genes one by one, combine the non-dominated partial sums with each
choice of the next gene, and prune what is dominated. The front's genomes are recovered from
back-pointers. This is the reference against which NSGA-II is measured (hypervolume ratio), and a
source of good seeds for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .pareto import non_dominated


@dataclass(frozen=True)
class ExactFront:
    memory: np.ndarray  # (points,) int64, ascending (gene bytes only: add fixed bytes for the total)
    loss: np.ndarray  # (points,) float64, descending (sum of S only: add base loss for the total)
    genomes: np.ndarray  # (points, genes) int64 bit-width indices

    def __len__(self) -> int:
        return len(self.memory)


def exact_front(cost: np.ndarray, sensitivity: np.ndarray, max_points: int | None = None) -> ExactFront:
    """Pareto front of ``sum_i cost[i, g_i]`` vs ``sum_i sensitivity[i, g_i]`` over all genomes g.

    ``max_points`` (optional) thins each intermediate front to that many points evenly spread in memory,
    bounding time and memory for very large instances; left unset the result is exact. A choice a gene
    cannot take is given loss ``inf``: it is never on a front.
    """
    cost = np.asarray(cost, dtype=np.int64)
    sens = np.asarray(sensitivity, dtype=np.float64)
    n_genes, n_choices = cost.shape
    memory = np.zeros(1, dtype=np.int64)
    loss = np.zeros(1, dtype=np.float64)
    parents: list[np.ndarray] = []
    choices: list[np.ndarray] = []
    for i in range(n_genes):
        cand_mem = (memory[:, None] + cost[i][None, :]).ravel()
        cand_loss = (loss[:, None] + sens[i][None, :]).ravel()
        keep = non_dominated(cand_mem, cand_loss)
        if max_points and len(keep) > max_points:
            keep = keep[np.unique(np.linspace(0, len(keep) - 1, max_points).round().astype(np.int64))]
        parents.append(keep // n_choices)
        choices.append(keep % n_choices)
        memory, loss = cand_mem[keep], cand_loss[keep]
    genomes = np.empty((len(memory), n_genes), dtype=np.int64)
    pointer = np.arange(len(memory))
    for i in range(n_genes - 1, -1, -1):
        genomes[:, i] = choices[i][pointer]
        pointer = parents[i][pointer]
    return ExactFront(memory=memory, loss=loss, genomes=genomes)


def front_for_space(space, max_points: int | None = None) -> ExactFront:
    """Exact front of a :class:`~search.space.SearchSpace`, with fixed bytes and base loss added."""
    cost, loss = space.sums_tables()
    f = exact_front(cost, loss, max_points)
    return ExactFront(memory=f.memory + space.fixed_bytes, loss=f.loss + space.base_loss, genomes=f.genomes)
