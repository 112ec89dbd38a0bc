"""The search space: one categorical gene per layer, and the two objectives as array sums.

Both objectives are sums over genes of a per-(gene, bit-width) table, so a genome is evaluated by
indexing: ``loss = base_loss + sum_i S[i, g_i]`` (predicted) and ``memory = fixed + sum_i C[i, g_i]``
(bytes, from the quantiser's storage layout). Genomes are held as bit-width *indices* into ``bits``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from profiling.profile import Profile

MIB = 1024 * 1024


@dataclass(frozen=True)
class SearchSpace:
    gene_names: tuple[str, ...]
    bits: tuple[int, ...]
    cost_bytes: np.ndarray  # (genes, bits) int64
    sensitivity: np.ndarray  # (genes, bits) float64
    gene_params: np.ndarray  # (genes,) int64
    fixed_bytes: int
    base_loss: float

    @classmethod
    def from_profile(cls, profile: Profile) -> "SearchSpace":
        return cls(tuple(profile.gene_names), tuple(profile.bits), np.asarray(profile.cost_bytes, dtype=np.int64),
                   np.asarray(profile.sensitivity, dtype=np.float64),
                   np.asarray(profile.gene_params, dtype=np.int64), int(profile.fixed_bytes),
                   float(profile.base_loss))

    @property
    def n_genes(self) -> int:
        return len(self.gene_names)

    def indices(self, bits_per_gene) -> np.ndarray:
        lookup = {b: j for j, b in enumerate(self.bits)}
        try:
            return np.array([lookup[int(b)] for b in bits_per_gene], dtype=np.int64)
        except KeyError as exc:
            raise ValueError(f"bit-width {exc.args[0]} is not one of the search's bits {list(self.bits)}") from None

    def bits_of(self, indices) -> list[int]:
        return [self.bits[int(j)] for j in indices]

    def uniform(self, bits: int) -> np.ndarray:
        return self.indices([bits] * self.n_genes)

    def predicted_loss(self, indices) -> np.ndarray | float:
        """Predicted loss of one genome (1-D) or many (2-D: genomes x genes)."""
        idx = np.asarray(indices)
        return self.base_loss + self.sensitivity[np.arange(self.n_genes), idx].sum(axis=-1)

    def memory_bytes(self, indices) -> np.ndarray | int:
        idx = np.asarray(indices)
        return self.fixed_bytes + self.cost_bytes[np.arange(self.n_genes), idx].sum(axis=-1)

    def average_bits(self, indices) -> float:
        b = np.asarray(self.bits, dtype=np.float64)[np.asarray(indices)]
        return float((b * self.gene_params).sum(axis=-1) / self.gene_params.sum())
