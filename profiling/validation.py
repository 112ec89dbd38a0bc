"""Measured validation: what a genome really does to the model on held-out text.

For each named genome (an archetype, a front point, a baseline) this fake-quantises the whole model
with :func:`~profiling.runner.quantized_weights` (the same quantiser and restore path as profiling, so
what is measured is what ships) and measures, on held-out tokens disjoint from calibration:

- loss and perplexity (PPL), and the PPL change over the dense model in percent;
- mean KL(p_dense || p_quantised) per token;
- weight memory from the memory model (``RTNQuantizer.weight_bytes`` per linear + the fixed, 16-bit
  rest), and the parameter-weighted average bit-width of the quantisable linears.

Genomes are held per *linear* (:class:`Genome`), whatever granularity they were searched at: a block
genome expands to its linears, and a mix that no block genome can express (the llama.cpp Q4_K_M-style
baseline) is built directly per linear. Bit-widths a profile never measured (6 bits for that mix) are
measurable all the same: measuring needs no profile.

The held-out tokens are cut into batches of sequences; each batch gets its own
:class:`~profiling.runner.PrefixRunner` (its dense reference), and each genome is quantised once and
run over every batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from .inventory import Gene, Inventory, LinearRef
from .quantizer import UNQUANTIZED_BITS, validate_bits
from .runner import PrefixRunner, next_token_loss, quantized_weights

MIB = 1024 * 1024
UNIFORM_BASELINE_BITS = (8, 4, 3, 2)
BASELINES = ("dense",) + tuple(f"uniform-{b}" for b in UNIFORM_BASELINE_BITS) + ("q4_k_m-mix",)
#: Name fragments of the layers the Q4_K_M-style mix raises (llama.cpp's attn_v and ffn_down).
V_PROJ_NAMES = ("v_proj", ".wv", "attn.v", ".value")
DOWN_PROJ_NAMES = ("down_proj", "dense_4h_to_h", ".w2", ".fc2", "mlp.c_proj")
Q4_K_M_LOW_BITS, Q4_K_M_HIGH_BITS = 4, 6


class ValidationCancelled(RuntimeError):
    """Raised when ``should_stop`` turns true between genomes."""


@dataclass(frozen=True)
class Genome:
    """A bit-width for every quantisable linear, plus what to call it and what was predicted.

    ``predicted_loss`` (optional) is the additive proxy's estimate (calibration base loss + sum of S),
    kept so a validation can compare predicted with measured.
    """

    name: str
    linears: tuple[LinearRef, ...]
    bits: tuple[int, ...]
    kind: str = "genome"  # "baseline", "archetype", "front", ...
    predicted_loss: float | None = None
    predicted_base_loss: float | None = None
    note: str = ""
    source: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.linears) != len(self.bits):
            raise ValueError(f"genome {self.name!r}: {len(self.bits)} bit-widths for {len(self.linears)} linears")
        for b in self.bits:
            validate_bits(int(b))

    def memory_bytes(self, quantizer, fixed_bytes: int) -> int:
        """Weight bytes from the memory model (what a packed checkpoint must match)."""
        return int(fixed_bytes + sum(quantizer.weight_bytes(lin.out_features, lin.in_features, int(b))
                                     for lin, b in zip(self.linears, self.bits)))

    @property
    def average_bits(self) -> float:
        params = np.array([lin.params for lin in self.linears], dtype=np.float64)
        return float((params * np.asarray(self.bits, dtype=np.float64)).sum() / params.sum())

    @property
    def is_dense(self) -> bool:
        return all(int(b) == UNQUANTIZED_BITS for b in self.bits)


def genome_from_genes(inventory: Inventory, bits: Sequence[int], name: str, **kw) -> Genome:
    """Expand a per-gene genome (block or linear granularity) to its linears."""
    bits = [int(b) for b in bits]
    if len(bits) != len(inventory.genes):
        raise ValueError(f"genome {name!r} has {len(bits)} genes but the model has {len(inventory.genes)} "
                         f"{inventory.granularity} genes")
    linears, per_linear = [], []
    for gene, b in zip(inventory.genes, bits):
        for lin in gene.linears:
            linears.append(lin)
            per_linear.append(b)
    return Genome(name=name, linears=tuple(linears), bits=tuple(per_linear), **kw)


def genome_from_mapping(inventory: Inventory, genes: dict[str, int], name: str, **kw) -> Genome:
    """A genome from ``{gene name: bits}`` (an artifact's genes); the names must be the inventory's."""
    names = inventory.gene_names()
    if set(genes) != set(names):
        missing = [n for n in names if n not in genes]
        extra = [n for n in genes if n not in set(names)]
        what = f"missing {missing[0]!r}" if missing else f"unknown gene {extra[0]!r}"
        raise ValueError(f"{name}: its genes do not match this model's {inventory.granularity} layers "
                         f"({what}): was it made for another architecture?")
    return genome_from_genes(inventory, [genes[n] for n in names], name, **kw)


def _all_linears(inventory: Inventory) -> tuple[LinearRef, ...]:
    return tuple(lin for gene in inventory.genes for lin in gene.linears)


# -- baselines ----------------------------------------------------------------------------------------

def uniform_genome(inventory: Inventory, bits: int, name: str | None = None) -> Genome:
    linears = _all_linears(inventory)
    label = name or ("dense" if bits == UNQUANTIZED_BITS else f"uniform-{bits}")
    note = "all linears unquantised" if bits == UNQUANTIZED_BITS else f"every linear at {bits}-bit RTN"
    return Genome(name=label, linears=linears, bits=tuple([int(bits)] * len(linears)), kind="baseline", note=note)


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers and every third between.

    Integer division as in llama.cpp's C++ (``7 * n / 8`` rounds down), which is what "the Q4_K_M
    mix" means in practice; on 30 layers: blocks 0-2, 5, 8, ..., 23 and 26-29.
    """
    return (i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8
            or (i_layer - n_layers // 8) % 3 == 2)


def q4_k_m_genome(inventory: Inventory, low_bits: int = Q4_K_M_LOW_BITS,
                  high_bits: int = Q4_K_M_HIGH_BITS) -> Genome:
    """The llama.cpp Q4_K_M-style mix, always per linear: 4-bit everywhere, the attention value
    projection and the MLP down projection at 6 bits on the blocks :func:`use_more_bits` picks.

    Built from the linears of any inventory: at block granularity one gene holds a whole block, so the
    mix cannot be a block genome; it is measured per linear all the same. Differences from llama.cpp:
    RTN with fp16 scale and zero per group (not K-quants' super-blocks), and the embedding/LM head stay
    at 16 bits like every non-gene parameter (llama.cpp stores the output at Q6_K).
    """
    linears = _all_linears(inventory)
    n_blocks = inventory.n_blocks
    bits, raised = [], 0
    for lin in linears:
        name = "." + lin.path
        special = name.endswith(V_PROJ_NAMES) or name.endswith(DOWN_PROJ_NAMES)
        high = special and use_more_bits(lin.block, n_blocks)
        raised += high
        bits.append(high_bits if high else low_bits)
    if not any(("." + lin.path).endswith(V_PROJ_NAMES + DOWN_PROJ_NAMES) for lin in linears):
        raise ValueError("the Q4_K_M-style mix needs separate attention value (v_proj) and MLP down "
                         "(down_proj) layers; this architecture has none: skip it or use uniform baselines")
    note = (f"llama.cpp Q4_K_M-style: {low_bits}-bit, v_proj/down_proj at {high_bits}-bit on "
            f"{sum(use_more_bits(i, n_blocks) for i in range(n_blocks))}/{n_blocks} blocks ({raised} linears); "
            f"per-linear (no block genome can express it)")
    return Genome(name="q4_k_m-mix", linears=linears, bits=tuple(bits), kind="baseline", note=note)


def baseline_genomes(inventory: Inventory, names: Iterable[str] = BASELINES) -> list[Genome]:
    """Baselines by name: ``dense``, ``uniform-B`` (B in 2-8) and ``q4_k_m-mix``."""
    out = []
    for name in names:
        if name == "dense":
            out.append(uniform_genome(inventory, UNQUANTIZED_BITS))
        elif name.startswith("uniform-") and name[8:].isdigit():
            out.append(uniform_genome(inventory, validate_bits(int(name[8:]))))
        elif name == "q4_k_m-mix":
            out.append(q4_k_m_genome(inventory))
        else:
            raise ValueError(f"unknown baseline {name!r}: choose from {', '.join(BASELINES)}")
    return out


# -- measuring --------------------------------------------------------------------------------------

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
    def measure(self, genome: Genome, quantizer) -> tuple[float, float]:
        """(loss, mean KL to dense) of ``genome`` on the held-out tokens."""
        genes = [Gene(lin.path, lin.block, (lin,)) for lin in genome.linears]
        losses, kls = [], []
        with quantized_weights(self.model, genes, genome.bits, quantizer):
            for runner in self.runners:
                logits = runner.full_logits()
                losses.append(next_token_loss(logits, runner.tokens))
                kls.append(0.0 if genome.is_dense else runner.dense.mean_kl(logits))
        return self._mean(losses), self._mean(kls)


def validate(model: torch.nn.Module, inventory: Inventory, heldout: torch.Tensor, quantizer,
             genomes: Sequence[Genome], progress: Callable[[ValidationEvent], None] | None = None,
             should_stop: Callable[[], bool] | None = None, tokens_source: str = "",
             batch_sequences: int = 4, evaluator: HeldoutEvaluator | None = None) -> ValidationResult:
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
        loss, kl = evaluator.measure(genome, quantizer)
        row = ValidationRow(
            name=genome.name, kind=genome.kind, memory_bytes=genome.memory_bytes(quantizer, inventory.fixed_bytes),
            average_bits=genome.average_bits, loss=loss, ppl=math.exp(loss),
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
        genes = [Gene(lin.path, lin.block, (lin,)) for lin in genome.linears]
        out.append(runner.kl_with(genes, list(genome.bits), quantizer))
    return out


def with_prediction(genome: Genome, predicted_loss: float | None, base_loss: float | None = None) -> Genome:
    return replace(genome, predicted_loss=predicted_loss, predicted_base_loss=base_loss)


# -- tables -----------------------------------------------------------------------------------------

TABLE_COLUMNS = ("genome", "kind", "avg bits", "weights MiB (memory model)", "PPL", "ΔPPL %", "KL to dense",
                 "predicted PPL")


def table_rows(result: ValidationResult) -> list[list[str]]:
    """Rows as display strings, in :data:`TABLE_COLUMNS` order. Nothing here is a throughput: none is
    measured."""
    out = []
    for r in result.rows:
        out.append([r.name, r.kind, f"{r.average_bits:.2f}", f"{r.memory_mib:.1f}", _num(r.ppl),
                    _signed(r.delta_ppl_pct), f"{r.kl:.4f}",
                    "" if r.predicted_ppl is None else f"{_num(r.predicted_ppl)} (pred.)"])
    return out


def table_notes(result: ValidationResult, extra: Sequence[str] = ()) -> list[str]:
    notes = [f"measured on {result.heldout_tokens} held-out tokens ({result.tokens_source or 'held-out set'}); "
             f"dense PPL {_num(result.dense_ppl)}",
             f"quantiser: {result.quantizer.get('name', 'rtn')} group {result.quantizer.get('group_size')}; "
             "memory: the memory model (bit-packed codes + fp16 scale/zero per group; non-quantised "
             "parameters at 16 bits), not a measured file size",
             "predicted PPL: the additive proxy on calibration tokens (a prediction, not a measurement)"]
    if result.fidelity:
        f = result.fidelity
        notes.append(f"proxy vs measured loss over {f['points']} predicted genomes: Spearman {_corr(f['spearman'])}, "
                     f"Pearson {_corr(f['pearson'])}")
    return notes + list(extra)


def render_terminal(result: ValidationResult, notes: Sequence[str] = ()) -> str:
    rows = table_rows(result)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(TABLE_COLUMNS)]
    numeric = [False, False] + [True] * (len(TABLE_COLUMNS) - 2)

    def line(cells):
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()

    out = [line(TABLE_COLUMNS), line(["-" * w for w in widths])] + [line(r) for r in rows]
    out += [""] + [f"* {n}" for n in table_notes(result, notes)]
    return "\n".join(out) + "\n"


def render_markdown(result: ValidationResult, notes: Sequence[str] = ()) -> str:
    def esc(c: str) -> str:
        return c.replace("|", "\\|")

    out = ["| " + " | ".join(TABLE_COLUMNS) + " |",
           "|" + "|".join(["---", "---"] + ["---:"] * (len(TABLE_COLUMNS) - 2)) + "|"]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in table_rows(result)]
    out += [""] + [f"- {n}" for n in table_notes(result, notes)]
    return "\n".join(out) + "\n"


CSV_FIELDS = ("name", "kind", "average_bits", "memory_bytes", "memory_mib", "memory_basis", "loss", "ppl",
              "delta_ppl_pct", "kl", "predicted_loss", "predicted_ppl", "heldout_tokens", "note")


def render_csv(result: ValidationResult) -> str:
    """One row per genome with raw numbers (predicted_* empty where nothing was predicted)."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in result.rows:
        d = r.to_dict()
        d["heldout_tokens"] = result.heldout_tokens
        writer.writerow({k: ("" if d.get(k) is None else d.get(k)) for k in CSV_FIELDS})
    return buf.getvalue()


def _num(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.2f}" if x < 1e4 else f"{x:.3g}"


def _signed(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:+.1f}" if abs(x) < 1e5 else f"{x:+.3g}"


def _corr(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


# -- held-out tokens and the validation setup ------------------------------------------------------------

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
    """A loaded model ready to validate genomes of any granularity on held-out tokens."""

    loaded: object  # profiling.models.LoadedModel
    quantizer: object
    heldout: torch.Tensor
    tokens_source: str
    batch_sequences: int = 4
    _inventories: dict = field(default_factory=dict)
    _evaluator: HeldoutEvaluator | None = None

    def inventory(self, granularity: str) -> Inventory:
        from .inventory import build_inventory

        if granularity not in self._inventories:
            self._inventories[granularity] = build_inventory(self.loaded.model, granularity)
        return self._inventories[granularity]

    def run(self, genomes: Sequence[Genome], progress=None, should_stop=None) -> ValidationResult:
        inv = self.inventory("linear")
        if self._evaluator is None:
            self._evaluator = HeldoutEvaluator(self.loaded.model, inv, self.heldout, self.batch_sequences,
                                               self.tokens_source)
        return validate(self.loaded.model, inv, self.heldout, self.quantizer, genomes, progress, should_stop,
                        self.tokens_source, self.batch_sequences, evaluator=self._evaluator)


def prepare_validation(loaded, quantizer_settings: dict, n_tokens: int = 2048, seq_len: int = 128,
                       text_file=None, calibration: dict | None = None) -> ValidationSetup:
    from .quantizer import make_quantizer

    quantizer = make_quantizer(quantizer_settings.get("name", "rtn"), quantizer_settings.get("group_size", 64))
    tokens, source = heldout_tokens(loaded.tokenizer, n_tokens, seq_len, text_file, calibration)
    return ValidationSetup(loaded, quantizer, tokens, source)


def measured_metrics(row: ValidationRow, result: ValidationResult) -> dict:
    """A row as an artifact's ``metrics.measured.heldout`` block (every number measured, except memory,
    which is labelled as the memory model's)."""
    return {"loss": row.loss, "ppl": row.ppl, "delta_ppl_pct": row.delta_ppl_pct, "kl": row.kl,
            "dense_loss": result.dense_loss, "dense_ppl": result.dense_ppl, "average_bits": row.average_bits,
            "memory_bytes": row.memory_bytes, "memory_basis": "memory model", "tokens": result.heldout_tokens,
            "on": result.tokens_source}
