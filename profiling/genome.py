"""A genome per weight: the qtype of every quantisable weight of a model, whatever the granularity.

Profiles and searches work on genes (a block, a linear, the embedding); validation, packing and GGUF
export work on weights. A block genome expands to its linears, and a mix no block genome can express
(llama.cpp's presets raise single tensors) is built directly per weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .inventory import Gene, Inventory, WeightRef


@dataclass(frozen=True)
class Genome:
    """A qtype for every quantisable weight, plus what to call it and what was predicted.

    ``predicted_loss`` (optional) is the additive proxy's estimate (calibration base loss + sum of S),
    kept so a validation can compare predicted with measured.
    """

    name: str
    weights: tuple[WeightRef, ...]
    qtypes: tuple[str, ...]
    kind: str = "genome"  # "baseline", "archetype", "front", ...
    predicted_loss: float | None = None
    predicted_base_loss: float | None = None
    note: str = ""
    source: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.weights) != len(self.qtypes):
            raise ValueError(f"genome {self.name!r}: {len(self.qtypes)} qtypes for {len(self.weights)} weights")

    def check(self, quantizer) -> "Genome":
        """Raise a one-line error if a qtype does not fit its weight under ``quantizer``."""
        for ref, q in zip(self.weights, self.qtypes):
            if not quantizer.valid_for(q, ref.out_features, ref.in_features):
                raise ValueError(f"{self.name}: {ref.path} ({ref.out_features}x{ref.in_features}) cannot be stored "
                                 f"as {q}")
        return self

    def memory_bytes(self, quantizer, fixed_bytes: int) -> int:
        """Weight bytes from the quantiser's layout plus the fixed rest (the memory model)."""
        return int(fixed_bytes + sum(quantizer.weight_bytes(q, ref.out_features, ref.in_features)
                                     for ref, q in zip(self.weights, self.qtypes)))

    def average_bits(self, quantizer) -> float:
        params = np.array([ref.params for ref in self.weights], dtype=np.float64)
        bits = np.array([quantizer.bits_per_weight(q) for q in self.qtypes], dtype=np.float64)
        return float((params * bits).sum() / params.sum())

    def is_dense(self, quantizer) -> bool:
        return all(q == quantizer.unquantized for q in self.qtypes)

    def as_genes(self) -> list[Gene]:
        """One single-weight gene per weight: what :func:`profiling.runner.quantized_weights` takes."""
        return [Gene(ref.path, ref.block, (ref,)) for ref in self.weights]


def genome_from_genes(inventory: Inventory, qtypes: Sequence[str], name: str, **kw) -> Genome:
    """Expand a per-gene genome (block or linear granularity) to its weights."""
    qtypes = [str(q) for q in qtypes]
    if len(qtypes) != len(inventory.genes):
        raise ValueError(f"genome {name!r} has {len(qtypes)} genes but the model has {len(inventory.genes)} "
                         f"{inventory.granularity} genes")
    weights, per_weight = [], []
    for gene, q in zip(inventory.genes, qtypes):
        for ref in gene.weights:
            weights.append(ref)
            per_weight.append(q)
    return Genome(name=name, weights=tuple(weights), qtypes=tuple(per_weight), **kw)


def genome_from_mapping(inventory: Inventory, genes: dict[str, str], name: str, **kw) -> Genome:
    """A genome from ``{gene name: qtype}`` (an artifact's genes); the names must be the inventory's."""
    names = inventory.gene_names()
    if set(genes) != set(names):
        missing = [n for n in names if n not in genes]
        extra = [n for n in genes if n not in set(names)]
        what = f"missing {missing[0]!r}" if missing else f"unknown gene {extra[0]!r}"
        raise ValueError(f"{name}: its genes do not match this model's {inventory.granularity} layers "
                         f"({what}): was it made for another architecture?")
    return genome_from_genes(inventory, [genes[n] for n in names], name, **kw)
