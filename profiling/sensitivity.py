"""Per-gene sensitivity: S(gene, bits) for every gene and bit-width, and the fidelity check.

- ``kl`` (default, measured): S = mean over calibration tokens of KL(p_dense || p_only-this-gene-quantised),
  computed with :class:`PrefixRunner` so only the blocks from the gene's block on are re-run.
- ``fisher`` (fast): S ~= 1/2 * sum(F * (Q_b(W) - W)^2) with F the diagonal empirical Fisher of the
  next-token loss, from one backward pass per calibration sequence. It estimates the same KL (to second
  order), at a fraction of the cost, but ranks genes less faithfully (design notes: Spearman ~0.8).

:func:`run_profile` ties loading, tokens, persistence and progress events together; the CLI and the
TUI both call it.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch

from .corpus import TokenSets, build_token_sets
from .inventory import Inventory, build_inventory, find_blocks, get_weight
from .memory import MemoryLayout, QuantizerLayout, memory_layout
from .models import LoadedModel, load_model
from .profile import Profile, ProfileCancelled, profile_key, skip_reason  # noqa: F401 (ProfileCancelled: re-exported)
from .quantizers import Quantizer, make_quantizer
from .runner import PrefixRunner
from .streaming import make_runner
from .settings import METRICS, SCREEN_MARGIN, SCREEN_TOKENS, STREAMED_FISHER, ProfileSettings, SettingsError


@dataclass(frozen=True)
class ProfileEvent:
    """One progress step. ``kind``: "start"; "reused" (cells stored before the start); "claim" (this
    worker starts measuring a gene); "entry" (a gene x qtype measured or skipped here); "remote" (a cell
    another worker stored, seen when polling the store); "wait" (every missing gene is held by other
    workers: ``held`` of them); "done". ``done`` counts every stored cell, whoever measured it.

    ``work_done`` / ``work_total``: the measuring work of this run in block passes (see
    :func:`cell_work`), so the ETA weighs a cell of an early block (a long tail) more than a late one."""

    kind: str
    done: int
    total: int
    gene_index: int = -1
    gene: str = ""
    qtype: str = ""
    value: float = float("nan")
    elapsed: float = 0.0
    work_done: float = 0.0
    work_total: float = 0.0
    work_seconds: float = 0.0  # seconds spent measuring so far (without loading and the dense pass)
    skipped: str = ""  # for a skipped (dominated) cell: the reason (profiling.profile.SKIP_REASONS)
    held: int = 0

    @property
    def eta_seconds(self) -> float | None:
        return eta_seconds(self.work_seconds, self.work_done, self.work_total) if self.kind != "done" else None


def eta_seconds(elapsed: float, work_done: float, work_total: float) -> float | None:
    """Seconds left at the measured rate of work (None before any work is done)."""
    if work_done <= 0 or elapsed <= 0:
        return None
    return max(elapsed / work_done * (work_total - work_done), 0.0)


def cell_work(gene_block: int, n_blocks: int, head_blocks: float) -> float:
    """What measuring one cell of a gene read first in ``gene_block`` costs, in block passes: the
    blocks from there to the end plus the head (``head_blocks``: the LM head and the KL in block
    units). The embedding (block -1) needs every block; an untied head (block n) only the head."""
    return float(n_blocks - min(max(gene_block, 0), n_blocks)) + head_blocks


def head_blocks(model: torch.nn.Module, inventory: Inventory) -> float:
    """The LM head's cost in block passes: its weights over one block's (both are matmuls per token)."""
    head = model.get_output_embeddings()
    n_blocks = max(1, 1 + max((g.block for g in inventory.genes if g.block >= 0), default=0))
    blocks = [w for w in inventory.weights if w.kind == "linear"]
    per_block = sum(w.params for w in blocks) / n_blocks if blocks else 1.0
    return float(head.weight.numel()) / max(per_block, 1.0) if head is not None else 1.0


ProgressCallback = Callable[[ProfileEvent], None]


# -- KL profile ----------------------------------------------------------------------------------

Cell = tuple[int, str]  # (gene index, qtype)


def cells_to_measure(inventory: Inventory, quantizer: Quantizer, qtypes, skip=frozenset()) -> list[list[Cell]]:
    """Per gene, the (gene, qtype) cells still to measure: the qtypes that fit it, minus ``skip``."""
    valid = inventory.valid_table(quantizer, qtypes)
    return [[(i, q) for j, q in enumerate(qtypes) if valid[i, j] and (i, q) not in skip]
            for i in range(len(inventory.genes))]


GeneSource = Iterable[tuple[int, list[Cell]]]  # (gene index, its cells to measure), e.g. gene_claims.ClaimedGenes


def kl_sensitivity(runner: PrefixRunner, inventory: Inventory, quantizer: Quantizer, qtypes,
                   skip: set[Cell] = frozenset(),
                   on_gene: Callable[[int, dict[str, float]], None] | None = None,
                   should_stop: Callable[[], bool] | None = None,
                   known: dict[Cell, float] | None = None, screen: "Screening | None" = None,
                   genes: GeneSource | None = None) -> dict[Cell, float]:
    """Measure S for every fitting (gene, qtype) not in ``skip``; ``on_gene`` gets each gene's results.

    ``genes``: which genes and cells to measure, in which order (default: every gene, in order; the
    claims of :mod:`profiling.gene_claims` when several workers share a store). ``screen`` (fast mode)
    lets :func:`measure_gene` skip dominated cells (stored as a :data:`profiling.profile.SKIP_MARKERS`
    value); ``known`` holds stored cells it may compare with. A runner with ``kl_batch`` (the streamed
    one) measures every cell exactly, all the cells of one block together when it has every gene to
    itself (the blocks after it are read from disk once for the batch), one gene's cells together when
    the genes are claimed one at a time."""
    results: dict[Cell, float] = {}
    known = known or {}
    if hasattr(runner, "kl_batch") and genes is None:
        return _kl_by_block(runner, inventory, quantizer, cells_to_measure(inventory, quantizer, qtypes, skip),
                            on_gene, should_stop)
    for i, cells in genes if genes is not None else enumerate(cells_to_measure(inventory, quantizer, qtypes, skip)):
        if hasattr(runner, "kl_batch"):
            if should_stop and should_stop():
                raise ProfileCancelled("profiling cancelled")
            gene_values = _kl_of_gene_batch(runner, inventory, quantizer, i, [q for _, q in cells])
        else:
            gene_known = {q: v for (g, q), v in known.items() if g == i}
            gene_values = measure_gene(runner, inventory, quantizer, i, [q for _, q in cells], gene_known, screen,
                                       should_stop)
        results.update({(i, q): v for q, v in gene_values.items()})
        if gene_values and on_gene:
            on_gene(i, gene_values)
    return results


def _kl_of_gene_batch(runner, inventory: Inventory, quantizer: Quantizer, gene_index: int, qtypes) -> dict[str, float]:
    """One gene's cells in one streamed pass (``runner.kl_batch``); the unquantised type is 0."""
    gene = inventory.genes[gene_index]
    quantised = [q for q in qtypes if q != quantizer.unquantized]
    values = dict(zip(quantised, runner.kl_batch([([gene], [q]) for q in quantised], quantizer))) if quantised else {}
    return {q: values.get(q, 0.0) for q in qtypes}


def _kl_by_block(runner, inventory: Inventory, quantizer: Quantizer, todo: list[list[Cell]], on_gene, should_stop
                 ) -> dict[Cell, float]:
    results: dict[Cell, float] = {}
    by_block: dict[int, list[int]] = {}
    for i, cells in enumerate(todo):
        if cells:
            by_block.setdefault(inventory.genes[i].block, []).append(i)
    for block in sorted(by_block):
        if should_stop and should_stop():
            raise ProfileCancelled("profiling cancelled")
        batch = [(i, q) for i in by_block[block] for _, q in todo[i] if q != quantizer.unquantized]
        values = runner.kl_batch([([inventory.genes[i]], [q]) for i, q in batch], quantizer)
        measured = dict(zip(batch, values))
        for i in by_block[block]:
            gene_values = {q: measured.get((i, q), 0.0) for _, q in todo[i]}
            results.update({(i, q): v for q, v in gene_values.items()})
            if on_gene:
                on_gene(i, gene_values)
    return results
@dataclass
class Screening:
    """Fast mode: a runner on a prefix of the calibration tokens and the margin a cell must lose by
    (S_screen >= (1 + margin) x S_screen of a cheaper-or-equal sibling) before it is skipped.
    ``runner`` None: the calibration is no longer than the screening prefix, so only the exact
    shortcuts (1 and 2 of :func:`measure_gene`) apply."""

    runner: PrefixRunner | None
    margin: float
    rest: PrefixRunner | None = None  # the calibration tokens after the screening ones

    def exact_from(self, screened: np.ndarray, gene, qtype: str, quantizer) -> float:
        """The exact S of a screened cell: its screening tokens plus the rest, so the screening pass
        is part of the exact measurement, not paid on top of it."""
        rest = self.rest.token_kl_with([gene], [qtype], quantizer).numpy() if self.rest is not None else np.empty(0)
        return max(float((screened.sum() + rest.sum()) / (len(screened) + len(rest))), 0.0)


def dominated_mask(cost: np.ndarray, value: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """Which cells of one gene cannot matter: cell j is dominated when a cell before it in (cost,
    value, index) order, hence cheaper or equal in bytes, has ``value <= value[j] / (1 + margin)``.

    ``value`` may be NaN (not known): such a cell dominates nothing, and is dominated only by a
    cheaper-or-equal cell of value 0 (an S is never negative). Of equal cells the first one stays."""
    cost = np.asarray(cost, dtype=np.float64)
    value = np.asarray(value, dtype=np.float64)
    known = ~np.isnan(value)
    order = np.lexsort((np.arange(len(cost)), np.where(known, value, np.inf), cost))
    out = np.zeros(len(cost), dtype=bool)
    best = np.inf  # the smallest known value among the cells before j
    for j in order:
        if best <= 0.0 or (known[j] and value[j] >= (1.0 + margin) * best):
            out[j] = True
        if known[j]:
            best = min(best, float(value[j]))
    return out


def gene_bytes(quantizer: Quantizer, gene, qtype: str) -> int:
    """Bytes of one gene's weights at ``qtype``: what "cheaper-or-equal" compares."""
    return sum(quantizer.weight_bytes(qtype, w.out_features, w.in_features) for w in gene.weights)


def stale_markers(inventory: Inventory, quantizer: Quantizer, stored: dict[Cell, float], qtypes) -> set[Cell]:
    """Stored skip markers that do not hold for the types asked for now.

    A cell was skipped because a cheaper-or-equal type of its gene was as good, among the types of the
    run that measured it. Qtypes are not part of a profile's key, so a later run may ask for fewer
    types: a marker stands only while every stored cheaper-or-equal cell of its gene is among the types
    asked for (its dominator is one of them). ``--types`` without q4_1 after a run with it: SmolLM2's
    q8_0 ... q5_0 were skipped for q4_1's S = 0, and must now be measured."""
    requested = set(qtypes)

    def cost_of(gene, q: str) -> float:
        try:
            return gene_bytes(quantizer, gene, q)
        except ValueError:  # a type this quantiser no longer offers: assume it was the cheaper one
            return -1.0

    by_gene: dict[int, dict[str, float]] = {}
    for (i, q), v in stored.items():
        if i < len(inventory.genes):
            by_gene.setdefault(i, {})[q] = v
    stale: set[Cell] = set()
    for i, cells in by_gene.items():
        gene = inventory.genes[i]
        cost = {q: cost_of(gene, q) for q in cells}
        for q, v in cells.items():
            if q in requested and skip_reason(v) and any(
                    p not in requested and cost[p] <= cost[q] for p in cells if p != q):
                stale.add((i, q))
    return stale


def measure_gene(runner: PrefixRunner, inventory: Inventory, quantizer: Quantizer, gene_index: int, qtypes,
                 known: dict[str, float] | None = None, screen: Screening | None = None,
                 should_stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """S of one gene at each of ``qtypes``: qtype -> value, or a skip marker for a dominated cell.

    Without ``screen`` (exact mode) every cell is measured on every calibration token. With it:
    1. a qtype whose quantised weights equal the dense ones bit for bit has S = 0 (no forward pass);
    2. a cell with a cheaper-or-equal sibling at S = 0 is dominated (marker "zero");
    3. the remaining cells that might lose to a cheaper-or-equal sibling (their weights' error says so)
       are measured on the screening tokens, and one that loses by the margin there, with confidence
       (:func:`screened_losers`), is dominated (marker "screened");
    4. every other cell is measured exactly, on every calibration token (a screened one on the
       tokens after the screening ones, added to its screening pass).
    ``known``: stored cells of this gene (from an earlier run), taken into account in 2."""
    gene = inventory.genes[gene_index]
    qtypes = list(qtypes)

    def stop_check() -> None:
        if should_stop and should_stop():
            raise ProfileCancelled("profiling cancelled")

    if screen is None:
        values = {}
        for q in qtypes:
            stop_check()
            values[q] = 0.0 if q == quantizer.unquantized else runner.kl_with([gene], [q], quantizer)
        return values

    from .profile import SKIP_VALUES, skip_reason
    from .quantizers.memo import MemoQuantizer

    known = {q: v for q, v in (known or {}).items() if q not in qtypes}
    memo = MemoQuantizer(quantizer, budget_bytes=1 << 30)  # quantise each (weight, qtype) once for 1, 3 and 4
    names = qtypes + list(known)
    cost = np.array([gene_bytes(quantizer, gene, q) for q in names], dtype=np.float64)
    exact = np.array([np.nan if skip_reason(known[q]) else known[q] for q in known], dtype=np.float64)
    value = np.concatenate([np.full(len(qtypes), np.nan), exact])
    values: dict[str, float] = {}
    # 1 + 2: cheapest first, so the types above a zero are never quantised at all
    for j in np.lexsort((np.arange(len(qtypes)), cost[:len(qtypes)])):
        q = qtypes[j]
        if dominated_mask(cost, value)[j]:
            continue
        if q == quantizer.unquantized or _weights_unchanged(runner, gene, q, memo):
            values[q] = value[j] = 0.0
    zero = dominated_mask(cost, value)
    for j, q in enumerate(qtypes):
        if zero[j] and q not in values:
            values[q] = SKIP_VALUES["zero"]
    todo = [j for j, q in enumerate(qtypes) if q not in values]
    # 3: screening, of the cells the weights' error says might lose to a cheaper-or-equal sibling
    pairs = _screening_pairs(cost, [_weight_error(runner, gene, qtypes[j], memo) for j in todo], todo) \
        if screen.runner is not None and len(todo) > 1 else set()
    if pairs:
        screened: dict[int, np.ndarray] = {}
        for j in sorted(pairs):
            stop_check()
            screened[j] = screen.runner.token_kl_with([gene], [qtypes[j]], memo).numpy()
        lost = screened_losers(cost, screened, screen.margin)
        for j in sorted(pairs):
            stop_check()
            values[qtypes[j]] = (SKIP_VALUES["screened"] if j in lost
                                 else screen.exact_from(screened[j], gene, qtypes[j], memo))
        todo = [j for j in todo if j not in pairs]
    # 4: the exact measurement
    for j in todo:
        stop_check()
        values[qtypes[j]] = runner.kl_with([gene], [qtypes[j]], memo)
    return {q: values[q] for q in qtypes}


#: How sure screening must be before it skips a cell: the lower confidence bound of the paired per-token
#: difference, mean - SCREEN_Z x standard error, must exceed the margin.
SCREEN_Z = 3.0


def screened_losers(cost: np.ndarray, token_kl: dict[int, np.ndarray], margin: float,
                    z: float = SCREEN_Z) -> set[int]:
    """The screened cells that lose, with confidence, to a cheaper-or-equal screened cell of the gene.

    Cell j loses to cell i (cost[i] <= cost[j], i before j in (cost, mean, index) order) when the
    per-token differences d = kl_j - kl_i on the screening tokens (the same tokens for both, so the
    pairing removes most of the noise) have mean(d) - z * stderr(d) >= margin * mean(kl_i): then
    S_j >= (1 + margin) S_i, with the noise of a few hundred tokens accounted for."""
    order = sorted(token_kl, key=lambda j: (cost[j], float(np.mean(token_kl[j])), j))
    lost: set[int] = set()
    for pos, j in enumerate(order):
        for i in order[:pos]:
            d = token_kl[j] - token_kl[i]
            stderr = float(np.std(d, ddof=1) / np.sqrt(len(d))) if len(d) > 1 else np.inf
            if float(np.mean(d)) - z * stderr >= margin * float(np.mean(token_kl[i])):
                lost.add(j)
                break
    return lost


#: Screening is worth a pass only where a cell might lose: its weights' error is at least this fraction
#: of a cheaper-or-equal sibling's (RTN's 4 bits vs 2 bits: ~1/16, never screened; two 4.5-bit ggml
#: types: ~1, screened). The gate only saves work: a cell it lets through is measured exactly.
SCREEN_ERROR_RATIO = 0.5


def _screening_pairs(cost: np.ndarray, errors: list[float], cells: list[int]) -> set[int]:
    """The cells worth screening: each cell whose error is >= SCREEN_ERROR_RATIO x the error of a
    cheaper-or-equal one (earlier in (cost, error) order: of equal bytes, the smaller error first), and
    that cheaper one."""
    order = sorted(range(len(cells)), key=lambda k: (cost[cells[k]], errors[k], cells[k]))
    out: set[int] = set()
    for pos, k in enumerate(order):
        for m in order[:pos]:
            if errors[k] >= SCREEN_ERROR_RATIO * errors[m]:
                out.update((cells[k], cells[m]))
    return out


def _weight_error(runner: PrefixRunner, gene, qtype: str, quantizer) -> float:
    """Sum over the gene's weights of the rounding error squared, weighted per input column by the
    importance (the mean of x^2) where there is one: a free, rough stand-in for S."""
    total = 0.0
    for ref in gene.weights:
        w = get_weight(runner.model, ref).detach()
        imp = runner.importance.get(ref.path) if runner.importance else None
        d2 = (quantizer.fake_quantize(w, qtype, imp).float() - w.float()) ** 2
        total += float((d2 * imp.float().reshape(1, -1)).sum() if imp is not None else d2.sum())
    return total


def _weights_unchanged(runner: PrefixRunner, gene, qtype: str, quantizer) -> bool:
    """Whether quantising ``gene`` to ``qtype`` leaves every one of its weights bit for bit as it is."""
    importance = runner.importance
    for ref in gene.weights:
        w = get_weight(runner.model, ref).detach()
        imp = importance.get(ref.path) if importance else None
        if not torch.equal(quantizer.fake_quantize(w, qtype, imp), w):
            return False
    return True


# -- Fisher profile ------------------------------------------------------------------------------

def fisher_diagonal(model: torch.nn.Module, inventory: Inventory, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher per gene weight: sum over sequences of (d sum-of-token-losses / dW)^2
    divided by the number of predicted tokens, i.e. a per-token Fisher (KL ~= 1/2 dW' F dW per token)."""
    weights = {ref.path: model.get_submodule(ref.path).weight for ref in inventory.weights}
    fisher = {path: torch.zeros_like(w, dtype=torch.float32) for path, w in weights.items()}
    weights_device = next(iter(weights.values())).device if weights else torch.device("cpu")
    for w in weights.values():
        w.requires_grad_(True)
    try:
        for seq in tokens:
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=seq[None].to(weights_device), use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), seq[1:].to(weights_device),
                                                     reduction="sum")
            loss.backward()
            for path, w in weights.items():
                if w.grad is not None:
                    fisher[path] += w.grad.detach().float() ** 2
    finally:
        for w in weights.values():
            w.requires_grad_(False)
            w.grad = None
    n_predicted = tokens.shape[0] * (tokens.shape[1] - 1)
    return {path: f / n_predicted for path, f in fisher.items()}


def fisher_sensitivity(model, inventory: Inventory, quantizer: Quantizer, qtypes, tokens: torch.Tensor,
                       skip: set[Cell] = frozenset(),
                       on_gene: Callable[[int, dict[str, float]], None] | None = None,
                       should_stop: Callable[[], bool] | None = None,
                       importance: dict[str, torch.Tensor] | None = None,
                       genes: GeneSource | None = None) -> dict[Cell, float]:
    fisher = fisher_diagonal(model, inventory, tokens)
    results: dict[Cell, float] = {}
    for i, cells in genes if genes is not None else enumerate(cells_to_measure(inventory, quantizer, qtypes, skip)):
        gene = inventory.genes[i]
        if should_stop and should_stop():
            raise ProfileCancelled("profiling cancelled")
        gene_values: dict[str, float] = {}
        for _, q in cells:
            value = 0.0
            if q != quantizer.unquantized:
                for ref in gene.weights:
                    w = get_weight(model, ref).detach().float()
                    f = fisher[ref.path].t() if ref.transposed else fisher[ref.path]
                    imp = importance.get(ref.path) if importance else None
                    value += 0.5 * float((f * (quantizer.fake_quantize(w, q, imp).to(f.device) - w) ** 2).sum())
            gene_values[q] = value
            results[(i, q)] = value
        if gene_values and on_gene:
            on_gene(i, gene_values)
    return results


# -- fidelity ------------------------------------------------------------------------------------

def random_genomes(profile: Profile, count: int, seed: int = 0) -> list[list[str]]:
    """Mixed genomes for the fidelity check: each gene drawn uniformly from its quantised qtypes."""
    rng = random.Random(seed)
    choices = []
    for i in range(profile.n_genes):
        options = profile.gene_qtypes(i)
        choices.append([q for q in options if q != profile.unquantized] or options)
    return [[rng.choice(c) for c in choices] for _ in range(count)]


def fidelity_check(profile: Profile, runner: PrefixRunner, inventory: Inventory, quantizer, count: int,
                   seed: int = 0) -> dict:
    """Additive prediction (sum of S) vs measured KL of ``count`` random mixed genomes."""
    predicted, measured = [], []
    for genome in random_genomes(profile, count, seed):
        predicted.append(profile.predicted_loss(genome) - profile.base_loss)
        measured.append(runner.kl_with(inventory.genes, genome, quantizer))
    return {"genomes": count, "predicted_kl": predicted, "measured_kl": measured,
            **correlations(predicted, measured)}


def correlations(x: list[float], y: list[float]) -> dict:
    import pandas as pd

    if len(x) < 2:
        return {"pearson": float("nan"), "spearman": float("nan")}
    s = pd.DataFrame({"x": x, "y": y})
    ranks = s.rank()  # Spearman = Pearson of ranks (ties averaged); avoids needing scipy
    return {"pearson": float(s.x.corr(s.y)), "spearman": float(ranks.x.corr(ranks.y))}


# -- the whole job ---------------------------------------------------------------------------------

@dataclass
class ProfileSetup:
    """What profiling needs, loaded once: the CLI, the TUI and validation reuse it."""

    settings: ProfileSettings
    loaded: LoadedModel
    inventory: Inventory
    tokens: TokenSets
    quantizer: Quantizer
    importance: dict[str, torch.Tensor] | None = None
    memory: MemoryLayout = field(default_factory=QuantizerLayout)
    stream_plan: object | None = None  # streaming.StreamPlan when --max-memory-mib / --stream was given

    @property
    def compute_dtype(self) -> str:
        p = next((p for p in self.loaded.model.parameters() if p.device.type != "meta"), None)
        return "float32" if p is None else str(p.dtype).removeprefix("torch.")

    @property
    def metric(self) -> str:
        return self.settings.metric or METRICS[0]

    @property
    def mode(self) -> str:
        """How the cells are measured: "fast" or "exact" (a Fisher profile is always "exact")."""
        return self.settings.mode if self.metric == "kl" else "exact"

    @property
    def key(self) -> str:
        return profile_key(self.loaded.fingerprint, self.tokens.fingerprint, self.quantizer.settings(),
                           self.inventory.granularity, self.metric, self.settings.embeddings_are_genes,
                           self.compute_dtype, self.mode)


def prepare(settings: ProfileSettings, loaded: LoadedModel | None = None) -> ProfileSetup:
    """Validate ``settings`` (before the slow load), load the model and cut the calibration tokens."""
    settings.validate()
    quantizer = make_quantizer(settings.quantizer)
    plan = None
    if loaded is None:
        loaded, plan = load_for(settings)
    if loaded.streamed and settings.metric == "fisher":
        raise SettingsError(STREAMED_FISHER)
    inventory = build_inventory(loaded.model, settings.granularity, settings.embeddings_are_genes)
    tokens = build_token_sets(loaded.tokenizer, settings.calib_tokens, settings.heldout_tokens, settings.seq_len,
                              settings.text_path)
    importance = None
    if getattr(quantizer, "uses_importance", False):
        from .imatrix import model_importance

        importance = model_importance(loaded.model, inventory, tokens.calibration, settings.quantizer.imatrix)
    return ProfileSetup(settings, loaded, inventory, tokens, quantizer, importance,
                        memory_layout(loaded, inventory, quantizer), plan)


def load_for(settings: ProfileSettings):
    """The model of ``settings`` on its device and dtype: streamed block by block when it is forced or
    its weights exceed ``max_memory_mib``, else in memory. Returns (loaded, stream plan or None); every
    check (device, dtype, cap) fails before any weight is read."""
    from .devices import resolve_device

    placement = resolve_device(settings.device, settings.dtype)
    if settings.max_memory_mib is None and not settings.stream:
        return load_model(settings.model, placement.dtype, placement.device), None
    from .streaming import load_streamed, plan_streaming

    plan, where = plan_streaming(settings, placement)
    if plan.stream:
        return load_streamed(where, placement), plan
    return load_model(settings.model, placement.dtype, placement.device), plan


def run_profile(setup: ProfileSetup, store=None, progress: ProgressCallback | None = None,
                should_stop: Callable[[], bool] | None = None, reuse_prefix: bool = True,
                runner: PrefixRunner | None = None, claim_ttl: float | None = None,
                poll_seconds: float | None = None) -> Profile:
    """Measure (or reuse from ``store``) S for every gene and fitting qtype and return the profile.

    With a store the genes are claimed one at a time (:mod:`profiling.gene_claims`), so any number of
    processes running this on the same storage split the work and all return the same profile, read
    from the store once every cell is there. ``claim_ttl``: seconds a claim of a dead worker blocks
    its gene (default ``$EMPAS_CLAIM_TTL`` or 180)."""
    qtypes = list(setup.quantizer.qtypes)
    started = time.perf_counter()
    inv, key, quantizer = setup.inventory, setup.key, setup.quantizer
    valid = inv.valid_table(quantizer, qtypes)
    total = int(valid.sum())
    known: dict[Cell, float] = {}
    stored_header = store.header(key) if store is not None else None
    if stored_header is not None:
        stored = store.entries(key)
        stale = stale_markers(inv, quantizer, stored, qtypes)
        if stale:  # measured now, for these types; the rows go so every worker sees them as missing
            store.drop_cells(key, stale)
        known = {k: v for k, v in stored.items() if k[1] in qtypes and k[0] < len(inv.genes) and k not in stale}
    if runner is None and (len(known) < total or stored_header is None):
        runner = make_runner(setup.loaded.model, inv, setup.tokens.calibration, reuse_prefix=reuse_prefix,
                             importance=setup.importance)
    base_loss = runner.base_loss if runner is not None else float(stored_header["base_loss"])
    header = {
        "model_id": setup.loaded.model_id, "model_fingerprint": setup.loaded.fingerprint,
        "corpus_source": setup.tokens.source, "corpus_fingerprint": setup.tokens.fingerprint,
        "calibration_tokens": setup.tokens.calibration_tokens, "quantizer": quantizer.settings(),
        "granularity": inv.granularity, "metric": setup.metric, "gene_names": inv.gene_names(),
        "include_embeddings": setup.settings.embeddings_are_genes,
        "base_loss": base_loss, "heldout_tokens": setup.tokens.heldout_tokens,
        "seq_len": int(setup.tokens.calibration.shape[1]), "mode": setup.mode,
    }
    if store is not None:
        store.ensure_header(key, header)
        base_loss = float(store.header(key)["base_loss"])  # the first worker's: every worker returns the same
    done = len(known)
    lock = threading.RLock()  # events come from this thread and from the claim keeper's
    n_blocks = len(find_blocks(setup.loaded.model)[1])
    head = head_blocks(setup.loaded.model, inv)
    pending = [c for cells in cells_to_measure(inv, quantizer, qtypes, set(known)) for c in cells]
    work = {c: cell_work(inv.genes[c[0]].block, n_blocks, head) for c in pending}
    work_total, work_done = sum(work.values()), 0.0
    measure_started = [time.perf_counter()]

    def emit(kind: str, **kw) -> None:
        if progress:
            now = time.perf_counter()
            progress(ProfileEvent(kind=kind, done=done, total=total, elapsed=now - started, work_done=work_done,
                                  work_total=work_total, work_seconds=now - measure_started[0], **kw))

    emit("start")
    if known:
        emit("reused")

    gene_started = [time.perf_counter()]
    source = None

    def on_gene(i: int, values: dict[str, float]) -> None:
        nonlocal done, work_done
        now = time.perf_counter()
        per_cell = (now - gene_started[0]) / max(len(values), 1)
        gene_started[0] = now
        cells = {(i, q): v for q, v in values.items()}
        if source is not None:  # stores the cells and releases the gene's claim together
            fresh = source.commit(i, cells, seconds=per_cell)
        else:
            fresh = set(cells)
        with lock:
            for q, v in values.items():
                done += (i, q) in fresh
                work_done += work.get((i, q), 0.0)
                reason = skip_reason(v) or ""
                emit("entry", gene_index=i, gene=inv.genes[i].name, qtype=q, value=float("nan") if reason else v,
                     skipped=reason)

    def on_remote(cells: dict[Cell, float]) -> None:
        nonlocal done
        with lock:
            for (i, q), v in cells.items():
                done += 1
                emit("remote", gene_index=i, gene=inv.genes[i].name, qtype=q, value=v)

    def on_claim(i: int) -> None:
        gene_started[0] = time.perf_counter()  # a wait for other workers is not this gene's time
        with lock:
            emit("claim", gene_index=i, gene=inv.genes[i].name)

    def on_wait(held: int) -> None:
        with lock:
            emit("wait", held=held)

    if store is not None:
        from storage.workers import claim_ttl as resolve_ttl

        from .gene_claims import POLL_SECONDS, ClaimedGenes

        source = ClaimedGenes(store, key, cells_to_measure(inv, quantizer, qtypes), seen=known,
                              ttl=resolve_ttl(claim_ttl), poll_seconds=poll_seconds or POLL_SECONDS,
                              on_remote=on_remote, on_claim=on_claim, on_wait=on_wait, should_stop=should_stop)
    skip = set(known)
    try:
        if setup.metric == "kl":
            screen = None
            if setup.mode == "fast" and pending and not hasattr(runner, "kl_batch"):  # streamed: every cell exact
                screen = make_screening(setup, runner)
            measure_started[0] = time.perf_counter()
            measured = kl_sensitivity(runner, inv, quantizer, qtypes, skip, on_gene, should_stop, known, screen,
                                      genes=source)
        else:
            measured = fisher_sensitivity(setup.loaded.model, inv, quantizer, qtypes, setup.tokens.calibration, skip,
                                          on_gene, should_stop, setup.importance, genes=source)
    finally:
        if source is not None:
            source.close()
    if store is not None:  # every worker builds the profile from the same stored cells
        values = {k: v for k, v in store.entries(key).items() if k[1] in qtypes and k[0] < len(inv.genes)}
    else:
        values = {**known, **measured}
    reasons = {c: skip_reason(v) for c, v in values.items() if skip_reason(v)}
    table = np.array([[values.get((i, q), np.nan) if valid[i, j] and (i, q) not in reasons else np.nan
                       for j, q in enumerate(qtypes)] for i in range(len(inv.genes))], dtype=np.float64)
    dominated = np.array([[valid[i, j] and (i, q) in reasons for j, q in enumerate(qtypes)]
                          for i in range(len(inv.genes))], dtype=bool)
    skipped = {r: sum(1 for c, why in reasons.items() if why == r and c[1] in qtypes) for r in set(reasons.values())}
    profile = Profile(
        model_id=setup.loaded.model_id, model_fingerprint=setup.loaded.fingerprint,
        corpus_source=setup.tokens.source, corpus_fingerprint=setup.tokens.fingerprint,
        calibration_tokens=setup.tokens.calibration_tokens, quantizer=quantizer.settings(),
        granularity=inv.granularity, metric=setup.metric, qtypes=qtypes,
        qtype_bits=[quantizer.bits_per_weight(q) for q in qtypes], gene_names=inv.gene_names(),
        gene_blocks=[g.block for g in inv.genes], gene_params=[g.params for g in inv.genes],
        cost_bytes=setup.memory.cost_table(inv, quantizer, qtypes), fixed_bytes=setup.memory.fixed_bytes(inv),
        memory_basis=setup.memory.basis,
        base_loss=base_loss, sensitivity=table, include_embeddings=setup.settings.embeddings_are_genes,
        unquantized=quantizer.unquantized, seconds=time.perf_counter() - started, reused_entries=len(known),
        remote_entries=source.remote if source is not None else 0,
        measured_seconds=(store.measured_seconds(key) if store is not None else time.perf_counter() - started),
        extra={"quantizer_settings": setup.settings.quantizer.to_dict(), "settings": setup.settings.to_dict(),
               "compute_dtype": setup.compute_dtype, "streamed": setup.loaded.streamed},
        mode=setup.mode, dominated=dominated, skipped=skipped,
    )
    emit("done")
    return profile


def make_screening(setup: ProfileSetup, runner: PrefixRunner, tokens: int = SCREEN_TOKENS,
                   margin: float = SCREEN_MARGIN) -> Screening:
    """Fast mode's screening: runners on the first whole sequences holding ``tokens`` calibration
    tokens and on the sequences after them, sharing the model, the importance matrix and the
    prefix-reuse decision of ``runner``. No screening runner when that would be every sequence."""
    calib = setup.tokens.calibration
    n_seq = max(1, tokens // calib.shape[1])
    if n_seq >= calib.shape[0]:
        return Screening(None, margin)

    def part(rows):
        return PrefixRunner(setup.loaded.model, setup.inventory, rows, reuse_prefix=runner.reuse_prefix,
                            importance=setup.importance)

    return Screening(part(calib[:n_seq]), margin, part(calib[n_seq:]))


def load_profile(setup: ProfileSetup, store) -> Profile | None:
    """The stored profile for ``setup`` if every fitting (gene, qtype) entry is there, else None."""
    header = store.header(setup.key)
    if header is None:
        return None
    entries = store.entries(setup.key)
    for cells in cells_to_measure(setup.inventory, setup.quantizer, setup.quantizer.qtypes):
        if any(c not in entries for c in cells):
            return None
    if stale_markers(setup.inventory, setup.quantizer, entries, setup.quantizer.qtypes):
        return None  # cells skipped for a type not asked for now still need measuring
    return run_profile(setup, store)
