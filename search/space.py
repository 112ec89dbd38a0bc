"""The search space: one categorical gene per layer, and the two objectives as array sums.

Both objectives are sums over genes of a per-(gene, qtype) table, so a genome is evaluated by
indexing: ``loss = base_loss + sum_i S[i, g_i]`` (predicted) and ``memory = fixed + sum_i C[i, g_i]``
(bytes, from the quantiser's storage layout or the GGUF file's). Genomes are held as *column
indices* into ``qtypes`` (int8 arrays); a gene may take only the qtypes that fit its shape
(``valid``), which is also what its Optuna distribution offers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from profiling.profile import Profile

MIB = 1024 * 1024


@dataclass(frozen=True)
class SearchSpace:
    gene_names: tuple[str, ...]
    qtypes: tuple[str, ...]
    qtype_bits: np.ndarray  # (qtypes,) nominal bits per weight
    cost_bytes: np.ndarray  # (genes, qtypes) int64, -1 where the qtype does not fit
    sensitivity: np.ndarray  # (genes, qtypes) float64, nan where the qtype does not fit
    gene_params: np.ndarray  # (genes,) int64
    fixed_bytes: int
    base_loss: float

    @classmethod
    def from_profile(cls, profile: Profile) -> "SearchSpace":
        """The space of ``profile``'s offered cells: a cell a fast profile skipped as dominated is left
        out like one that does not fit (a cheaper-or-equal type of that gene is as good)."""
        cost = np.where(profile.offered, np.asarray(profile.cost_bytes, dtype=np.int64), -1)
        return cls(tuple(profile.gene_names), tuple(profile.qtypes), np.asarray(profile.qtype_bits, dtype=np.float64),
                   cost, np.asarray(profile.sensitivity, dtype=np.float64),
                   np.asarray(profile.gene_params, dtype=np.int64), int(profile.fixed_bytes),
                   float(profile.base_loss))

    @property
    def n_genes(self) -> int:
        return len(self.gene_names)

    @property
    def valid(self) -> np.ndarray:
        return self.cost_bytes >= 0

    def choices(self, i: int) -> list[int]:
        """Column indices gene ``i`` may take, in the profile's qtype order."""
        return [int(j) for j in np.flatnonzero(self.valid[i])]

    def sums_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """(cost, loss) tables safe to sum: a qtype that does not fit costs 0 and loses inf."""
        valid = self.valid
        return np.where(valid, self.cost_bytes, 0), np.where(valid, self.sensitivity, np.inf)

    # -- genomes ------------------------------------------------------------------------------------
    def indices(self, qtypes) -> np.ndarray:
        """Column indices of a genome given as qtypes, one per gene (one-line error if one does not fit)."""
        lookup = {q: j for j, q in enumerate(self.qtypes)}
        values = [str(q) for q in qtypes]
        if len(values) != self.n_genes:
            raise ValueError(f"genome has {len(values)} genes, the search {self.n_genes}")
        try:
            idx = np.array([lookup[q] for q in values], dtype=np.int64)
        except KeyError as exc:
            raise ValueError(f"qtype {exc.args[0]} is not one of the search's {','.join(self.qtypes)}") from None
        bad = ~self.valid[np.arange(self.n_genes), idx]
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"gene {self.gene_names[i]} cannot take {values[i]}")
        return idx

    def qtypes_of(self, indices) -> list[str]:
        return [self.qtypes[int(j)] for j in np.asarray(indices).reshape(-1)]

    def parse(self, text: str) -> np.ndarray | None:
        """A stored genome string ("q4_k,q6_k,...") as int8 indices, or None if it does not fit."""
        try:
            idx = self.indices(text.split(","))
        except ValueError:
            return None
        return idx.astype(np.int8)

    def text(self, indices) -> str:
        return ",".join(self.qtypes_of(indices))

    def uniform(self, qtype: str) -> np.ndarray:
        """Every gene at ``qtype``, or, where it does not fit, at the fitting qtype nearest in bits
        (ties: the larger), the way llama.cpp falls back to another type on an unfit row."""
        j0 = self.qtypes.index(qtype)
        target = self.qtype_bits[j0]
        out = np.empty(self.n_genes, dtype=np.int64)
        for i in range(self.n_genes):
            if self.valid[i, j0]:
                out[i] = j0
                continue
            cols = np.flatnonzero(self.valid[i])
            out[i] = cols[np.lexsort((-self.qtype_bits[cols], np.abs(self.qtype_bits[cols] - target)))[0]]
        return out

    # -- objectives ------------------------------------------------------------------------------------
    def predicted_loss(self, indices) -> np.ndarray | float:
        """Predicted loss of one genome (1-D) or many (2-D: genomes x genes)."""
        idx = np.asarray(indices, dtype=np.int64)
        return self.base_loss + self.sensitivity[np.arange(self.n_genes), idx].sum(axis=-1)

    def memory_bytes(self, indices) -> np.ndarray | int:
        idx = np.asarray(indices, dtype=np.int64)
        return self.fixed_bytes + self.cost_bytes[np.arange(self.n_genes), idx].sum(axis=-1)

    def average_bits(self, indices) -> np.ndarray | float:
        """Parameter-weighted nominal bits per weight of one genome or many."""
        b = self.qtype_bits[np.asarray(indices, dtype=np.int64)]
        return (b * self.gene_params).sum(axis=-1) / self.gene_params.sum()
