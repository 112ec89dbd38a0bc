"""The sensitivity profile: everything the search needs, as plain arrays.

``sensitivity[i, j]`` is S(gene i, qtypes[j]): the mean KL divergence (nats per token) from the dense
model's next-token distribution to the one with only gene *i* quantised to ``qtypes[j]`` (or, for the
``fisher`` metric, the Fisher estimate of it). ``cost_bytes[i, j]`` is what gene *i* weighs at
``qtypes[j]``; ``fixed_bytes`` is everything that is not a gene. A qtype that does not fit a gene
(ggml's K-quants on a row that is not a multiple of 256) has ``cost_bytes == -1`` and
``sensitivity == nan``: the search never offers it to that gene.

A ``fast`` profile (docs/profiling.md) also skips cells that cannot matter: a cell whose
cheaper-or-equal-bytes sibling in the same gene is as good or better is *dominated* (``dominated[i, j]``,
``sensitivity == nan``). Like a cell that does not fit, it is not offered to the search (``offered``),
but it is counted separately (``skipped``: how many, and why).

A profile is self-contained: a study stores it in its attributes and needs nothing else.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np


PROFILE_SCHEMA = 2
#: Bumped when the measurement itself changes, so stored profiles of an older method are not reused
#: (2: per-token KL summed in float64; version 1 lost 8-bit sensitivities to float32 cancellation.
#: 3: qtypes as strings, embedding genes, per-gene valid qtypes).
MEASUREMENT_VERSION = 3


class ProfileCancelled(RuntimeError):
    """Raised when ``should_stop`` turns true while profiling; finished genes are already persisted."""


#: Stored values of skipped cells (a measured S is never negative), by reason.
SKIP_MARKERS = {-1.0: "zero", -2.0: "screened"}
SKIP_VALUES = {reason: value for value, reason in SKIP_MARKERS.items()}
SKIP_REASONS = {"zero": "a cheaper-or-equal type of the gene has S = 0 exactly (its weights are unchanged)",
                "screened": "on the screening tokens it lost by the margin to a cheaper-or-equal type of the gene"}


def skip_reason(value: float) -> str | None:
    """The reason a stored cell value marks a skipped (dominated) cell, or None for a measured value."""
    return SKIP_MARKERS.get(float(value))


def profile_key(model_fingerprint: str, corpus_fingerprint: str, quantizer: dict, granularity: str,
                metric: str, include_embeddings: bool = False, compute_dtype: str = "float32",
                mode: str = "exact") -> str:
    """What makes two profiles interchangeable. Qtypes are not part of it: entries are per qtype.

    A profile measured in another compute dtype than float32 (bf16 on a GPU) is another profile, and so
    is a fast KL profile (its skipped cells); the float32 exact key is unchanged, so profiles stored
    before dtypes and modes existed are still found."""
    parts = [model_fingerprint, corpus_fingerprint, quantizer, granularity, metric, bool(include_embeddings),
             MEASUREMENT_VERSION]
    if compute_dtype != "float32":
        parts.append(compute_dtype)
    if metric == "kl" and mode != "exact":
        from .settings import SCREEN_MARGIN, SCREEN_TOKENS

        parts.append([mode, SCREEN_TOKENS, SCREEN_MARGIN])
    blob = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@dataclass
class Profile:
    model_id: str
    model_fingerprint: str
    corpus_source: str
    corpus_fingerprint: str
    calibration_tokens: int
    quantizer: dict  # the quantiser's identity (QuantizerSettings-independent of the qtype list)
    granularity: str
    metric: str
    qtypes: list[str]
    qtype_bits: list[float]  # nominal bits per weight of each qtype, for average bits
    gene_names: list[str]
    gene_blocks: list[int]
    gene_params: list[int]
    cost_bytes: np.ndarray  # (genes, qtypes) int64; -1 where the qtype does not fit the gene
    fixed_bytes: int
    base_loss: float
    sensitivity: np.ndarray  # (genes, qtypes) float64; nan where the qtype does not fit the gene
    include_embeddings: bool = False
    memory_basis: str = "memory model"  # or "gguf file": fixed + costs are the GGUF file's bytes
    unquantized: str = "16"
    seconds: float = 0.0  # this run's wall time (small when everything was reused)
    reused_entries: int = 0  # cells stored before this run started
    remote_entries: int = 0  # cells other workers stored while this run ran (docs/workers.md)
    measured_seconds: float = 0.0  # the time spent measuring every entry, whichever run measured it
    extra: dict = field(default_factory=dict)
    mode: str = "exact"  # "fast": dominated cells were skipped (see ``dominated``)
    dominated: np.ndarray | None = None  # (genes, qtypes) bool: skipped as dominated; None: none skipped
    skipped: dict = field(default_factory=dict)  # reason -> number of cells skipped for it (SKIP_REASONS)

    def __post_init__(self) -> None:
        shape = np.asarray(self.cost_bytes).shape
        self.dominated = (np.zeros(shape, dtype=bool) if self.dominated is None
                          else np.asarray(self.dominated, dtype=bool).reshape(shape))

    @property
    def key(self) -> str:
        return profile_key(self.model_fingerprint, self.corpus_fingerprint, self.quantizer, self.granularity,
                           self.metric, self.include_embeddings, self.extra.get("compute_dtype", "float32"),
                           self.mode)

    @property
    def n_genes(self) -> int:
        return len(self.gene_names)

    @property
    def base_ppl(self) -> float:
        return math.exp(self.base_loss)

    @property
    def valid(self) -> np.ndarray:
        """(genes, qtypes) bool: which qtypes each gene may take."""
        return np.asarray(self.cost_bytes) >= 0

    @property
    def offered(self) -> np.ndarray:
        """(genes, qtypes) bool: what the search offers each gene: fitting and not dominated."""
        return self.valid & ~self.dominated

    def gene_qtypes(self, i: int) -> list[str]:
        """The qtypes offered to gene ``i``."""
        return [q for q, ok in zip(self.qtypes, self.offered[i]) if ok]

    def skipped_text(self) -> str:
        """One line: how many cells a fast profile skipped, and why ("" when none)."""
        if not self.skipped or not sum(self.skipped.values()):
            return ""
        parts = [f"{n} because {SKIP_REASONS.get(r, r)}" for r, n in sorted(self.skipped.items()) if n]
        return f"{int(self.dominated.sum())} dominated cells skipped (not offered to the search): " + "; ".join(parts)

    def dense_bytes(self) -> int:
        """Bytes with every gene unquantised."""
        j = self.qtypes.index(self.unquantized) if self.unquantized in self.qtypes else None
        if j is None:
            return int(self.fixed_bytes + 2 * sum(self.gene_params))
        return int(self.fixed_bytes + self.cost_bytes[:, j].sum())

    def timing_text(self, seconds_text=None) -> str:
        """How long the profile took: the time it took to measure when every entry came from the
        storage (not this run's fraction of a second), else this run's time and what was reused."""
        fmt = seconds_text or (lambda x: f"{x:.1f}s")
        valid = int(self.valid.sum())
        if self.reused_entries and self.reused_entries >= valid:
            return f"measured earlier in {fmt(self.measured_seconds)}; all {self.reused_entries} entries reused"
        reused = f", {self.reused_entries} of {valid} entries reused" if self.reused_entries else ""
        remote = f", {self.remote_entries} of {valid} measured by other workers" if self.remote_entries else ""
        return f"took {fmt(self.seconds)}{reused}{remote}"

    def qtype_index(self, qtypes) -> np.ndarray:
        """Column index of each gene's qtype; one-line error for a qtype the profile lacks or a gene
        cannot take."""
        lookup = {q: j for j, q in enumerate(self.qtypes)}
        values = [str(q) for q in qtypes]
        if len(values) != self.n_genes:
            raise ValueError(f"genome has {len(values)} genes, the profile {self.n_genes}")
        try:
            idx = np.array([lookup[q] for q in values], dtype=np.int64)
        except KeyError as exc:
            raise ValueError(f"qtype {exc.args[0]} is not in the profile's qtypes {','.join(self.qtypes)}") from None
        bad = ~self.valid[np.arange(self.n_genes), idx]
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"gene {self.gene_names[i]} cannot take {values[i]}: its shape allows "
                             f"{','.join(self.gene_qtypes(i))}")
        return idx

    def predicted_loss(self, qtypes) -> float:
        idx = self.qtype_index(qtypes)
        return float(self.base_loss + self.sensitivity[np.arange(self.n_genes), idx].sum())

    def memory_bytes(self, qtypes) -> int:
        idx = self.qtype_index(qtypes)
        return int(self.fixed_bytes + self.cost_bytes[np.arange(self.n_genes), idx].sum())

    def average_bits(self, qtypes) -> float:
        idx = self.qtype_index(qtypes)
        params = np.asarray(self.gene_params, dtype=np.float64)
        return float((params * np.asarray(self.qtype_bits, dtype=np.float64)[idx]).sum() / params.sum())

    def ranking(self) -> list[int]:
        """Gene indices, most sensitive first: by S at the smallest qtype each gene can take."""
        bits = np.asarray(self.qtype_bits, dtype=np.float64)
        worst = np.array([self.sensitivity[i, self._smallest(i, bits)] for i in range(self.n_genes)])
        return list(np.argsort(-np.nan_to_num(worst, nan=-np.inf), kind="stable"))

    def _smallest(self, i: int, bits: np.ndarray) -> int:
        cols = np.flatnonzero(self.offered[i])
        return int(cols[np.argmin(bits[cols])])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schema"] = PROFILE_SCHEMA
        d["cost_bytes"] = self.cost_bytes.tolist()
        d["dominated"] = self.dominated.tolist()
        d["sensitivity"] = [[None if not math.isfinite(v) else float(v) for v in row] for row in self.sensitivity]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        if d.get("schema") != PROFILE_SCHEMA:
            raise ValueError(f"profile schema {d.get('schema')!r} is not {PROFILE_SCHEMA} (made by an older EMPAS): "
                             f"re-run `empas profile`")
        d = {k: v for k, v in d.items() if k != "schema"}
        d["cost_bytes"] = np.asarray(d["cost_bytes"], dtype=np.int64)
        d["sensitivity"] = np.array([[np.nan if v is None else v for v in row] for row in d["sensitivity"]],
                                    dtype=np.float64).reshape(d["cost_bytes"].shape)
        if d.get("dominated") is not None:
            d["dominated"] = np.asarray(d["dominated"], dtype=bool)
        return cls(**d)

    def table_rows(self) -> list[dict]:
        """One row per gene, most sensitive first: for the CLI table and the TUI (None: does not fit)."""
        rows = []
        for i in self.ranking():
            row = {"gene": self.gene_names[i], "params": self.gene_params[i]}
            row.update({f"S@{q}": (float(self.sensitivity[i, j]) if self.offered[i, j] else None)
                        for j, q in enumerate(self.qtypes)})
            row["dominated"] = [q for j, q in enumerate(self.qtypes) if self.dominated[i, j]]
            rows.append(row)
        return rows
