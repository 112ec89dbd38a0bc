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
from .inventory import Inventory, build_inventory, get_weight
from .memory import MemoryLayout, QuantizerLayout, memory_layout
from .models import LoadedModel, load_model
from .profile import Profile, profile_key
from .quantizers import Quantizer, make_quantizer
from .runner import PrefixRunner
from .settings import METRICS, ProfileSettings


class ProfileCancelled(RuntimeError):
    """Raised when ``should_stop`` turns true; finished genes are already persisted."""


@dataclass(frozen=True)
class ProfileEvent:
    """One progress step. ``kind``: "start"; "reused" (cells stored before the start); "claim" (this
    worker starts measuring a gene); "entry" (a gene x qtype measured here); "remote" (a cell another
    worker stored, seen when polling the store); "wait" (every missing gene is held by other workers:
    ``held`` of them); "done". ``done`` counts every stored cell, whoever measured it."""

    kind: str
    done: int
    total: int
    gene_index: int = -1
    gene: str = ""
    qtype: str = ""
    value: float = float("nan")
    elapsed: float = 0.0
    held: int = 0

    @property
    def eta_seconds(self) -> float | None:
        measured = self.done
        if measured <= 0 or self.kind == "done":
            return None
        return self.elapsed / measured * (self.total - measured)


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
                   genes: GeneSource | None = None) -> dict[Cell, float]:
    """Measure S for every fitting (gene, qtype) not in ``skip``; ``on_gene`` gets each gene's results.
    ``genes``: which genes and cells to measure, in which order (default: every gene, in order)."""
    results: dict[Cell, float] = {}
    for i, cells in genes if genes is not None else enumerate(cells_to_measure(inventory, quantizer, qtypes, skip)):
        gene = inventory.genes[i]
        gene_values: dict[str, float] = {}
        for _, q in cells:
            if should_stop and should_stop():
                raise ProfileCancelled("profiling cancelled")
            gene_values[q] = 0.0 if q == quantizer.unquantized else runner.kl_with([gene], [q], quantizer)
            results[(i, q)] = gene_values[q]
        if gene_values and on_gene:
            on_gene(i, gene_values)
    return results


# -- Fisher profile ------------------------------------------------------------------------------

def fisher_diagonal(model: torch.nn.Module, inventory: Inventory, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher per gene weight: sum over sequences of (d sum-of-token-losses / dW)^2
    divided by the number of predicted tokens, i.e. a per-token Fisher (KL ~= 1/2 dW' F dW per token)."""
    weights = {ref.path: model.get_submodule(ref.path).weight for ref in inventory.weights}
    fisher = {path: torch.zeros_like(w) for path, w in weights.items()}
    for w in weights.values():
        w.requires_grad_(True)
    try:
        for seq in tokens:
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=seq[None], use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), seq[1:], reduction="sum")
            loss.backward()
            for path, w in weights.items():
                if w.grad is not None:
                    fisher[path] += w.grad.detach() ** 2
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
                    w = get_weight(model, ref).detach()
                    f = fisher[ref.path].t() if ref.transposed else fisher[ref.path]
                    imp = importance.get(ref.path) if importance else None
                    value += 0.5 * float((f * (quantizer.fake_quantize(w, q, imp) - w) ** 2).sum())
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

    @property
    def metric(self) -> str:
        return self.settings.metric or METRICS[0]

    @property
    def key(self) -> str:
        return profile_key(self.loaded.fingerprint, self.tokens.fingerprint, self.quantizer.settings(),
                           self.inventory.granularity, self.metric, self.settings.embeddings_are_genes)


def prepare(settings: ProfileSettings, loaded: LoadedModel | None = None) -> ProfileSetup:
    """Validate ``settings`` (before the slow load), load the model and cut the calibration tokens."""
    settings.validate()
    quantizer = make_quantizer(settings.quantizer)
    loaded = loaded or load_model(settings.model)
    inventory = build_inventory(loaded.model, settings.granularity, settings.embeddings_are_genes)
    tokens = build_token_sets(loaded.tokenizer, settings.calib_tokens, settings.heldout_tokens, settings.seq_len,
                              settings.text_path)
    importance = None
    if getattr(quantizer, "uses_importance", False):
        from .imatrix import model_importance

        importance = model_importance(loaded.model, inventory, tokens.calibration, settings.quantizer.imatrix)
    return ProfileSetup(settings, loaded, inventory, tokens, quantizer, importance,
                        memory_layout(loaded, inventory, quantizer))


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
        known = {k: v for k, v in store.entries(key).items() if k[1] in qtypes and k[0] < len(inv.genes)}
    if runner is None and (len(known) < total or stored_header is None):
        runner = PrefixRunner(setup.loaded.model, inv, setup.tokens.calibration, reuse_prefix=reuse_prefix,
                              importance=setup.importance)
    base_loss = runner.base_loss if runner is not None else float(stored_header["base_loss"])
    header = {
        "model_id": setup.loaded.model_id, "model_fingerprint": setup.loaded.fingerprint,
        "corpus_source": setup.tokens.source, "corpus_fingerprint": setup.tokens.fingerprint,
        "calibration_tokens": setup.tokens.calibration_tokens, "quantizer": quantizer.settings(),
        "granularity": inv.granularity, "metric": setup.metric, "gene_names": inv.gene_names(),
        "include_embeddings": setup.settings.embeddings_are_genes,
        "base_loss": base_loss, "heldout_tokens": setup.tokens.heldout_tokens,
        "seq_len": int(setup.tokens.calibration.shape[1]),
    }
    if store is not None:
        store.ensure_header(key, header)
        base_loss = float(store.header(key)["base_loss"])  # the first worker's: every worker returns the same
    done = len(known)
    lock = threading.RLock()  # events come from this thread and from the claim keeper's

    def emit(kind: str, **kw) -> None:
        if progress:
            progress(ProfileEvent(kind=kind, done=done, total=total, elapsed=time.perf_counter() - started, **kw))

    emit("start")
    if known:
        emit("reused")

    gene_started = [time.perf_counter()]
    source = None

    def on_gene(i: int, values: dict[str, float]) -> None:
        nonlocal done
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
                emit("entry", gene_index=i, gene=inv.genes[i].name, qtype=q, value=v)

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
            measured = kl_sensitivity(runner, inv, quantizer, qtypes, skip, on_gene, should_stop, genes=source)
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
    table = np.array([[values.get((i, q), np.nan) if valid[i, j] else np.nan for j, q in enumerate(qtypes)]
                      for i in range(len(inv.genes))], dtype=np.float64)
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
        extra={"quantizer_settings": setup.settings.quantizer.to_dict(), "settings": setup.settings.to_dict()},
    )
    emit("done")
    return profile


def load_profile(setup: ProfileSetup, store) -> Profile | None:
    """The stored profile for ``setup`` if every fitting (gene, qtype) entry is there, else None."""
    header = store.header(setup.key)
    if header is None:
        return None
    entries = store.entries(setup.key)
    for cells in cells_to_measure(setup.inventory, setup.quantizer, setup.quantizer.qtypes):
        if any(c not in entries for c in cells):
            return None
    return run_profile(setup, store)
