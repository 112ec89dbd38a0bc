"""The sensitivity profile: everything the search needs, as plain arrays.

``sensitivity[i, j]`` is S(gene i, bits[j]): the mean KL divergence (nats per token) from the dense
model's next-token distribution to the one with only gene *i* quantised to ``bits[j]`` (or, for the
``fisher`` metric, the Fisher estimate of it). ``cost_bytes[i, j]`` is what gene *i* weighs at
``bits[j]``; ``fixed_bytes`` is every parameter that is not a gene, at 16 bits.
A profile is self-contained: a study stores it in its attributes and needs nothing else.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

PROFILE_SCHEMA = 1
#: Bumped when the measurement itself changes, so stored profiles of an older method are not reused
#: (2: per-token KL summed in float64; version 1 lost 8-bit sensitivities to float32 cancellation).
MEASUREMENT_VERSION = 2
METRICS = ("kl", "fisher")


def profile_key(model_fingerprint: str, corpus_fingerprint: str, quantizer: dict, granularity: str,
                metric: str) -> str:
    """What makes two profiles interchangeable. Bit-widths are not part of it: entries are per bit."""
    blob = json.dumps([model_fingerprint, corpus_fingerprint, quantizer, granularity, metric, MEASUREMENT_VERSION],
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@dataclass
class Profile:
    model_id: str
    model_fingerprint: str
    corpus_source: str
    corpus_fingerprint: str
    calibration_tokens: int
    quantizer: dict
    granularity: str
    metric: str
    bits: list[int]
    gene_names: list[str]
    gene_blocks: list[int]
    gene_params: list[int]
    cost_bytes: np.ndarray  # (genes, bits) int64
    fixed_bytes: int
    base_loss: float
    sensitivity: np.ndarray  # (genes, bits) float64
    seconds: float = 0.0
    reused_entries: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return profile_key(self.model_fingerprint, self.corpus_fingerprint, self.quantizer, self.granularity,
                           self.metric)

    @property
    def n_genes(self) -> int:
        return len(self.gene_names)

    @property
    def base_ppl(self) -> float:
        return math.exp(self.base_loss)

    def dense_bytes(self) -> int:
        return int(self.fixed_bytes + 2 * sum(self.gene_params))

    def bit_index(self, bits: list[int] | np.ndarray) -> np.ndarray:
        """Column index of each gene's bit-width (raises on a width the profile lacks)."""
        lookup = {b: j for j, b in enumerate(self.bits)}
        try:
            return np.array([lookup[int(b)] for b in bits], dtype=np.int64)
        except KeyError as exc:
            raise ValueError(f"bit-width {exc.args[0]} is not in the profile's bits {self.bits}") from None

    def predicted_loss(self, bits: list[int] | np.ndarray) -> float:
        idx = self.bit_index(bits)
        return float(self.base_loss + self.sensitivity[np.arange(self.n_genes), idx].sum())

    def memory_bytes(self, bits: list[int] | np.ndarray) -> int:
        idx = self.bit_index(bits)
        return int(self.fixed_bytes + self.cost_bytes[np.arange(self.n_genes), idx].sum())

    def average_bits(self, bits: list[int] | np.ndarray) -> float:
        params = np.asarray(self.gene_params, dtype=np.float64)
        return float((params * np.asarray(bits, dtype=np.float64)).sum() / params.sum())

    def ranking(self) -> list[int]:
        """Gene indices, most sensitive first (by the sensitivity at the lowest bit-width)."""
        column = int(np.argmin(self.bits))
        return list(np.argsort(-self.sensitivity[:, column], kind="stable"))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schema"] = PROFILE_SCHEMA
        d["cost_bytes"] = self.cost_bytes.tolist()
        d["sensitivity"] = self.sensitivity.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        if d.get("schema") != PROFILE_SCHEMA:
            raise ValueError(f"profile schema {d.get('schema')!r} is not {PROFILE_SCHEMA}: re-run `empas profile`")
        d = {k: v for k, v in d.items() if k != "schema"}
        d["cost_bytes"] = np.asarray(d["cost_bytes"], dtype=np.int64)
        d["sensitivity"] = np.asarray(d["sensitivity"], dtype=np.float64)
        return cls(**d)

    def table_rows(self) -> list[dict]:
        """One row per gene, most sensitive first: for the CLI table and the TUI."""
        rows = []
        for i in self.ranking():
            row = {"gene": self.gene_names[i], "params": self.gene_params[i]}
            row.update({f"S@{b}": float(self.sensitivity[i, j]) for j, b in enumerate(self.bits)})
            rows.append(row)
        return rows
