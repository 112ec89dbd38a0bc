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
from typing import Callable

import numpy as np
import torch

from .corpus import TokenSets, build_token_sets
from .inventory import Inventory, build_inventory, get_weight
from .memory import MemoryLayout, QuantizerLayout, memory_layout
from .models import LoadedModel, load_model
from .profile import Profile, profile_key
from .quantizers import Quantizer, make_quantizer
from .runner import PrefixRunner
from .streaming import make_runner
from .settings import METRICS, STREAMED_FISHER, ProfileSettings, SettingsError


class ProfileCancelled(RuntimeError):
    """Raised when ``should_stop`` turns true; finished genes are already persisted."""


@dataclass(frozen=True)
class ProfileEvent:
    """One progress step. ``kind``: "start", "entry" (a gene x qtype measured), "reused", "done"."""

    kind: str
    done: int
    total: int
    gene_index: int = -1
    gene: str = ""
    qtype: str = ""
    value: float = float("nan")
    elapsed: float = 0.0

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


def kl_sensitivity(runner: PrefixRunner, inventory: Inventory, quantizer: Quantizer, qtypes,
                   skip: set[Cell] = frozenset(),
                   on_gene: Callable[[int, dict[str, float]], None] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> dict[Cell, float]:
    """Measure S for every fitting (gene, qtype) not in ``skip``; ``on_gene`` gets each gene's results.

    A runner with ``kl_batch`` (the streamed one) measures all the cells of one block together: the
    blocks after it are read from disk once for the batch, not once per cell."""
    results: dict[Cell, float] = {}
    todo = cells_to_measure(inventory, quantizer, qtypes, skip)
    if hasattr(runner, "kl_batch"):
        return _kl_by_block(runner, inventory, quantizer, todo, on_gene, should_stop)
    for i, cells in enumerate(todo):
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
                       importance: dict[str, torch.Tensor] | None = None) -> dict[Cell, float]:
    fisher = fisher_diagonal(model, inventory, tokens)
    results: dict[Cell, float] = {}
    for i, cells in enumerate(cells_to_measure(inventory, quantizer, qtypes, skip)):
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
    def key(self) -> str:
        return profile_key(self.loaded.fingerprint, self.tokens.fingerprint, self.quantizer.settings(),
                           self.inventory.granularity, self.metric, self.settings.embeddings_are_genes,
                           self.compute_dtype)


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
                runner: PrefixRunner | None = None) -> Profile:
    """Measure (or reuse from ``store``) S for every gene and fitting qtype and return the profile."""
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
        "seq_len": int(setup.tokens.calibration.shape[1]),
    }
    if store is not None:
        store.ensure_header(key, header)
    done = len(known)
    lock = threading.Lock()

    def emit(kind: str, **kw) -> None:
        if progress:
            progress(ProfileEvent(kind=kind, done=done, total=total, elapsed=time.perf_counter() - started, **kw))

    emit("start")
    if known:
        emit("reused")

    gene_started = [time.perf_counter()]

    def on_gene(i: int, values: dict[str, float]) -> None:
        nonlocal done
        now = time.perf_counter()
        per_cell = (now - gene_started[0]) / max(len(values), 1)
        gene_started[0] = now
        if store is not None:
            store.add_entries(key, {(i, q): v for q, v in values.items()}, seconds=per_cell)
        with lock:
            for q, v in values.items():
                done += 1
                emit("entry", gene_index=i, gene=inv.genes[i].name, qtype=q, value=v)

    skip = set(known)
    if setup.metric == "kl":
        measured = kl_sensitivity(runner, inv, quantizer, qtypes, skip, on_gene, should_stop)
    else:
        measured = fisher_sensitivity(setup.loaded.model, inv, quantizer, qtypes, setup.tokens.calibration, skip,
                                      on_gene, should_stop, setup.importance)
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
        measured_seconds=(store.measured_seconds(key) if store is not None else time.perf_counter() - started),
        extra={"quantizer_settings": setup.settings.quantizer.to_dict(), "settings": setup.settings.to_dict(),
               "compute_dtype": setup.compute_dtype, "streamed": setup.loaded.streamed},
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
