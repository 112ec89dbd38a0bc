"""Measured validation: what a genome really does to the model on held-out text.

For each named genome (an archetype, a front point, a baseline) this fake-quantises the whole model
with :func:`~profiling.runner.quantized_weights` (the same quantiser and restore path as profiling, so
what is measured is what ships) and measures, on held-out tokens disjoint from calibration:

- loss and perplexity (PPL), and the PPL change over the dense model in percent;
- mean KL(p_dense || p_quantised) per token;
- weight memory from the memory model (the quantiser's ``weight_bytes`` per weight + the fixed, 16-bit
  rest), and the parameter-weighted average bits of the quantisable weights.

Genomes are held per *weight* (:class:`profiling.genome.Genome`), whatever granularity they were
searched at. Qtypes a profile never measured (6 bits for the Q4_K_M-style mix) are measurable all the
same: measuring needs no profile. Tables of results: :mod:`profiling.evaluation_report`.

The held-out tokens are cut into batches of sequences; each batch gets its own
:class:`~profiling.runner.PrefixRunner` (its dense reference), and each genome is quantised once and
run over every batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
import torch

from .genome import Genome
from .inventory import Inventory
from .runner import PrefixRunner, next_token_loss, quantized_weights

MIB = 1024 * 1024


class ValidationCancelled(RuntimeError):
    """Raised when ``should_stop`` turns true between genomes."""


@dataclass(frozen=True)
class ValidationRow:
    """Measured numbers of one genome (memory: from the memory model, not a packed file)."""

    name: str
    kind: str
    memory_bytes: int
    average_bits: float
    loss: float  # mean next-token cross-entropy on the held-out tokens (nats)
    ppl: float
    delta_ppl_pct: float  # vs dense on the same tokens
    kl: float  # mean KL(dense || quantised) per token (nats)
    predicted_loss: float | None = None
    predicted_ppl: float | None = None
    note: str = ""
    seconds: float = 0.0
    source: dict = field(default_factory=dict)

    @property
    def memory_mib(self) -> float:
        return self.memory_bytes / MIB

    def to_dict(self) -> dict:
        return {
            "name": self.name, "kind": self.kind, "memory_bytes": self.memory_bytes,
            "memory_mib": round(self.memory_mib, 4), "memory_basis": "memory model",
            "average_bits": round(self.average_bits, 4), "loss": self.loss, "ppl": self.ppl,
            "delta_ppl_pct": self.delta_ppl_pct, "kl": self.kl, "predicted_loss": self.predicted_loss,
            "predicted_ppl": self.predicted_ppl, "note": self.note, "seconds": round(self.seconds, 3),
            "source": self.source,
        }


@dataclass(frozen=True)
class ValidationEvent:
    """Progress: ``kind`` is "start", "genome" (one measured; ``row`` set) or "done"."""

    kind: str
    done: int
    total: int
    name: str = ""
    row: ValidationRow | None = None
    elapsed: float = 0.0

    @property
    def eta_seconds(self) -> float | None:
        if self.done <= 0 or self.kind == "done":
            return None
        return self.elapsed / self.done * (self.total - self.done)


@dataclass
class ValidationResult:
    rows: list[ValidationRow]
    dense_loss: float
    heldout_tokens: int
    tokens_source: str
    quantizer: dict
    fidelity: dict | None = None  # predicted vs measured over rows that carry a prediction

    @property
    def dense_ppl(self) -> float:
        return math.exp(self.dense_loss)

    def row(self, name: str) -> ValidationRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {"heldout_tokens": self.heldout_tokens, "tokens_source": self.tokens_source,
                "quantizer": self.quantizer, "dense_loss": self.dense_loss, "dense_ppl": self.dense_ppl,
                "rows": [r.to_dict() for r in self.rows], "fidelity": self.fidelity}


class HeldoutEvaluator:
    """Dense references of held-out batches, ready to measure any number of genomes."""

    def __init__(self, model: torch.nn.Module, inventory: Inventory, tokens: torch.Tensor,
                 batch_sequences: int = 4, source: str = ""):
        if tokens.dim() != 2 or tokens.numel() == 0:
            raise ValueError("held-out tokens must be a non-empty (sequences, length) tensor")
        self.model, self.inventory, self.tokens, self.source = model, inventory, tokens, source
        # Whole-model genomes change block 0, so the prefix cache would never be used: skip it.
        self.runners = [PrefixRunner(model, inventory, tokens[i:i + batch_sequences], reuse_prefix=False)
                        for i in range(0, tokens.shape[0], batch_sequences)]
        self.weights = [r.tokens.shape[0] for r in self.runners]  # sequences per batch (same length)
        self.dense_loss = self._mean([r.base_loss for r in self.runners])

    def _mean(self, values: list[float]) -> float:
        return float(np.average(values, weights=self.weights))

    @torch.no_grad()
    def measure(self, genome: Genome, quantizer, importance=None) -> tuple[float, float]:
        """(loss, mean KL to dense) of ``genome`` on the held-out tokens."""
        losses, kls = [], []
        dense = genome.is_dense(quantizer)
        with quantized_weights(self.model, genome.as_genes(), genome.qtypes, quantizer, importance):
            for runner in self.runners:
                logits = runner.full_logits()
                losses.append(next_token_loss(logits, runner.tokens))
                kls.append(0.0 if dense else runner.dense.mean_kl(logits))
        return self._mean(losses), self._mean(kls)


def validate(model: torch.nn.Module, inventory: Inventory, heldout: torch.Tensor, quantizer,
             genomes: Sequence[Genome], progress: Callable[[ValidationEvent], None] | None = None,
             should_stop: Callable[[], bool] | None = None, tokens_source: str = "",
             batch_sequences: int = 4, evaluator: HeldoutEvaluator | None = None,
             importance=None) -> ValidationResult:
    """Measure every genome on ``heldout`` and return one row each, in order.

    ``inventory`` gives the fixed (non-gene) bytes of the memory model; genomes carry their own
    linears. Rows whose genome carries a ``predicted_loss`` are compared with what was measured
    (Pearson and Spearman of predicted vs measured loss) in ``fidelity``.
    """
    started = time.perf_counter()
    evaluator = evaluator or HeldoutEvaluator(model, inventory, heldout, batch_sequences, tokens_source)
    total = len(genomes)

    def emit(kind: str, done: int, **kw) -> None:
        if progress:
            progress(ValidationEvent(kind, done, total, elapsed=time.perf_counter() - started, **kw))

    emit("start", 0)
    rows = []
    for k, genome in enumerate(genomes):
        if should_stop and should_stop():
            raise ValidationCancelled("validation cancelled")
        t0 = time.perf_counter()
        genome.check(quantizer)
        loss, kl = evaluator.measure(genome, quantizer, importance)
        row = ValidationRow(
            name=genome.name, kind=genome.kind, memory_bytes=genome.memory_bytes(quantizer, inventory.fixed_bytes),
            average_bits=genome.average_bits(quantizer), loss=loss, ppl=math.exp(loss),
            delta_ppl_pct=100.0 * math.expm1(loss - evaluator.dense_loss), kl=kl,
            predicted_loss=genome.predicted_loss,
            predicted_ppl=None if genome.predicted_loss is None else math.exp(genome.predicted_loss),
            note=genome.note, seconds=time.perf_counter() - t0, source=dict(genome.source))
        rows.append(row)
        emit("genome", k + 1, name=genome.name, row=row)
    result = ValidationResult(rows=rows, dense_loss=evaluator.dense_loss,
                              heldout_tokens=int(heldout.numel()), tokens_source=tokens_source or evaluator.source,
                              quantizer=quantizer.settings(), fidelity=proxy_fidelity(rows))
    emit("done", total)
    return result


def proxy_fidelity(rows: Sequence[ValidationRow]) -> dict | None:
    """Predicted vs measured loss over the rows that carry a prediction (None if fewer than two)."""
    from .sensitivity import correlations

    pairs = [(r.predicted_loss, r.loss) for r in rows if r.predicted_loss is not None]
    if len(pairs) < 2:
        return None
    predicted, measured = [p for p, _ in pairs], [m for _, m in pairs]
    c = correlations(predicted, measured)
    return {"points": len(pairs), "predicted_loss": predicted, "measured_loss": measured,
            "pearson": _nan_to_none(c["pearson"]), "spearman": _nan_to_none(c["spearman"])}


def _nan_to_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def measured_calibration_kl(runner: PrefixRunner, genomes: Sequence[Genome], quantizer,
                            should_stop: Callable[[], bool] | None = None) -> list[float]:
    """Mean KL to dense of each genome on the runner's (calibration) tokens: the measured objective
    used to refine a choice among front points without looking at the held-out set."""
    out = []
    for genome in genomes:
        if should_stop and should_stop():
            raise ValidationCancelled("validation cancelled")
        out.append(runner.kl_with(genome.as_genes(), list(genome.qtypes), quantizer))
    return out


def with_prediction(genome: Genome, predicted_loss: float | None, base_loss: float | None = None) -> Genome:
    return replace(genome, predicted_loss=predicted_loss, predicted_base_loss=base_loss)


def heldout_tokens(tokenizer, n_tokens: int = 2048, seq_len: int = 128, text_file=None,
                   calibration: dict | None = None) -> tuple[torch.Tensor, str]:
    """Held-out tokens disjoint from the calibration a profile used, and a description of them.

    ``calibration`` is what an artifact records (``{"corpus": "default" | path, "tokens": N}``):
    - default-corpus calibration (or unknown): the default corpus's held-out half, which comes from other
      standard-library modules than the calibration half;
    - calibration on a text file: the end of that same file, after the N calibration tokens (the
      corpus module refuses a file too short to keep them apart);
    - ``text_file`` given: that file's end (after the calibration tokens if it is the calibration file).
    """
    from pathlib import Path

    from .corpus import CorpusError, build_token_sets

    calibration = calibration or {}
    corpus = calibration.get("corpus") or "default"
    calib_n = calibration.get("tokens")
    calib_n = calib_n if isinstance(calib_n, int) and not isinstance(calib_n, bool) and calib_n > 0 else seq_len
    if text_file is None and corpus != "default":
        if not Path(corpus).is_file():
            raise CorpusError(f"the calibration text {corpus} is not here: pass --text FILE with held-out text")
        text_file = corpus
    if text_file is None:
        sets = build_token_sets(tokenizer, seq_len, n_tokens, seq_len, None)
        return sets.heldout, "default corpus, held-out modules"
    same = corpus != "default" and Path(text_file).resolve() == Path(corpus).resolve()
    sets = build_token_sets(tokenizer, calib_n if same else 1, n_tokens, seq_len, text_file)
    where = "after the calibration tokens" if same else "a text other than the calibration corpus"
    return sets.heldout, f"end of {Path(text_file).name} ({where})"


@dataclass
class ValidationSetup:
    """A loaded model ready to validate genomes of any granularity on held-out tokens.

    ``include_embeddings``: the inventory whose fixed bytes the memory column uses (embedding genes
    quantised, or kept at 16 bits)."""

    loaded: object  # profiling.models.LoadedModel
    quantizer: object
    heldout: torch.Tensor
    tokens_source: str
    batch_sequences: int = 4
    include_embeddings: bool = False
    importance: dict | None = None
    _inventories: dict = field(default_factory=dict)
    _evaluator: HeldoutEvaluator | None = None

    def inventory(self, granularity: str) -> Inventory:
        from .inventory import build_inventory

        if granularity not in self._inventories:
            self._inventories[granularity] = build_inventory(self.loaded.model, granularity, self.include_embeddings)
        return self._inventories[granularity]

    def run(self, genomes: Sequence[Genome], progress=None, should_stop=None) -> ValidationResult:
        inv = self.inventory("linear")
        if self._evaluator is None:
            self._evaluator = HeldoutEvaluator(self.loaded.model, inv, self.heldout, self.batch_sequences,
                                               self.tokens_source)
        return validate(self.loaded.model, inv, self.heldout, self.quantizer, genomes, progress, should_stop,
                        self.tokens_source, self.batch_sequences, evaluator=self._evaluator,
                        importance=self.importance)


def prepare_validation(loaded, quantizer, n_tokens: int = 2048, seq_len: int = 128, text_file=None,
                       calibration: dict | None = None, include_embeddings: bool = False,
                       importance: dict | None = None) -> ValidationSetup:
    """Held-out tokens disjoint from ``calibration`` and the ``quantizer`` (built once by the caller)."""
    tokens, source = heldout_tokens(loaded.tokenizer, n_tokens, seq_len, text_file, calibration)
    return ValidationSetup(loaded, quantizer, tokens, source, include_embeddings=include_embeddings,
                           importance=importance)


def measured_metrics(row: ValidationRow, result: ValidationResult) -> dict:
    """A row as an artifact's ``metrics.measured.heldout`` block (every number measured, except memory,
    which is labelled as the memory model's)."""
    return {"loss": row.loss, "ppl": row.ppl, "delta_ppl_pct": row.delta_ppl_pct, "kl": row.kl,
            "dense_loss": result.dense_loss, "dense_ppl": result.dense_ppl, "average_bits": row.average_bits,
            "memory_bytes": row.memory_bytes, "memory_basis": "memory model", "tokens": result.heldout_tokens,
            "on": result.tokens_source}
