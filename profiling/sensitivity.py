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
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .corpus import TokenSets, build_token_sets, validate_token_options
from .inventory import Inventory, build_inventory, get_weight
from .models import LoadedModel, load_model
from .profile import METRICS, Profile, profile_key
from .quantizer import RTNQuantizer, make_quantizer, validate_bits
from .runner import PrefixRunner, quantized_weights


class ProfileCancelled(RuntimeError):
    """Raised when ``should_stop`` turns true; finished genes are already persisted."""


@dataclass(frozen=True)
class ProfileEvent:
    """One progress step. ``kind``: "start", "entry" (a gene x bit measured), "reused", "done"."""

    kind: str
    done: int
    total: int
    gene_index: int = -1
    gene: str = ""
    bits: int = 0
    value: float = float("nan")
    elapsed: float = 0.0

    @property
    def eta_seconds(self) -> float | None:
        measured = self.done
        if measured <= 0 or self.kind == "done":
            return None
        return self.elapsed / measured * (self.total - measured)


ProgressCallback = Callable[[ProfileEvent], None]


def parse_bits(text: str | list[int]) -> list[int]:
    """"2,4,8,16" -> [2, 4, 8, 16] (sorted, unique), with one clear error for anything else."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"bit list {text!r} must be comma-separated integers, e.g. 2,4,8,16") from None
    else:
        values = list(text)
    if not values:
        raise ValueError("bit list is empty: pass e.g. --bits 2,4,8,16")
    for b in values:
        validate_bits(b)
    return sorted(set(values))


# -- KL profile ----------------------------------------------------------------------------------

def kl_sensitivity(runner: PrefixRunner, inventory: Inventory, quantizer, bits: list[int],
                   skip: set[tuple[int, int]] = frozenset(),
                   on_gene: Callable[[int, dict[int, float]], None] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> dict[tuple[int, int], float]:
    """Measure S for every (gene, bits) not in ``skip``; ``on_gene`` gets each gene's results."""
    results: dict[tuple[int, int], float] = {}
    for i, gene in enumerate(inventory.genes):
        gene_values: dict[int, float] = {}
        for b in bits:
            if (i, b) in skip:
                continue
            if should_stop and should_stop():
                raise ProfileCancelled("profiling cancelled")
            gene_values[b] = 0.0 if b == 16 else runner.kl_with([gene], [b], quantizer)
            results[(i, b)] = gene_values[b]
        if gene_values and on_gene:
            on_gene(i, gene_values)
    return results


# -- Fisher profile ------------------------------------------------------------------------------

def fisher_diagonal(model: torch.nn.Module, inventory: Inventory, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher per gene weight: sum over sequences of (d sum-of-token-losses / dW)^2
    divided by the number of predicted tokens, i.e. a per-token Fisher (KL ~= 1/2 dW' F dW per token)."""
    weights = {lin.path: model.get_submodule(lin.path).weight for g in inventory.genes for lin in g.linears}
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


def fisher_sensitivity(model, inventory: Inventory, quantizer, bits: list[int], tokens: torch.Tensor,
                       skip: set[tuple[int, int]] = frozenset(),
                       on_gene: Callable[[int, dict[int, float]], None] | None = None,
                       should_stop: Callable[[], bool] | None = None) -> dict[tuple[int, int], float]:
    fisher = fisher_diagonal(model, inventory, tokens)
    results: dict[tuple[int, int], float] = {}
    for i, gene in enumerate(inventory.genes):
        if should_stop and should_stop():
            raise ProfileCancelled("profiling cancelled")
        gene_values: dict[int, float] = {}
        for b in bits:
            if (i, b) in skip:
                continue
            value = 0.0
            if b != 16:
                for lin in gene.linears:
                    w = get_weight(model, lin).detach()
                    f = fisher[lin.path].t() if lin.transposed else fisher[lin.path]
                    value += 0.5 * float((f * (quantizer.fake_quantize(w, b) - w) ** 2).sum())
            gene_values[b] = value
            results[(i, b)] = value
        if gene_values and on_gene:
            on_gene(i, gene_values)
    return results


# -- fidelity ------------------------------------------------------------------------------------

def random_genomes(n_genes: int, bits: list[int], count: int, seed: int = 0) -> list[list[int]]:
    """Mixed genomes for the fidelity check: each gene drawn uniformly from the quantised widths."""
    rng = random.Random(seed)
    choices = [b for b in bits if b != 16] or bits
    return [[rng.choice(choices) for _ in range(n_genes)] for _ in range(count)]


def fidelity_check(profile: Profile, runner: PrefixRunner, inventory: Inventory, quantizer, count: int,
                   seed: int = 0) -> dict:
    """Additive prediction (sum of S) vs measured KL of ``count`` random mixed genomes."""
    predicted, measured = [], []
    for genome in random_genomes(profile.n_genes, profile.bits, count, seed):
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

    loaded: LoadedModel
    inventory: Inventory
    tokens: TokenSets
    quantizer: RTNQuantizer
    metric: str

    @property
    def key(self) -> str:
        return profile_key(self.loaded.fingerprint, self.tokens.fingerprint, self.quantizer.settings(),
                           self.inventory.granularity, self.metric)


def prepare(model: str | None = None, granularity: str = "block", metric: str = "kl", group_size: int = 64,
            calib_tokens: int = 512, heldout_tokens: int = 512, seq_len: int = 128, text_file=None,
            loaded: LoadedModel | None = None) -> ProfileSetup:
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not one of {', '.join(METRICS)}")
    quantizer = make_quantizer("rtn", group_size)
    validate_token_options(calib_tokens, heldout_tokens, seq_len, text_file)  # fail before the slow load
    loaded = loaded or load_model(model)
    inventory = build_inventory(loaded.model, granularity)
    tokens = build_token_sets(loaded.tokenizer, calib_tokens, heldout_tokens, seq_len, text_file)
    return ProfileSetup(loaded, inventory, tokens, quantizer, metric)


def run_profile(setup: ProfileSetup, bits: list[int], store=None, progress: ProgressCallback | None = None,
                should_stop: Callable[[], bool] | None = None, reuse_prefix: bool = True,
                runner: PrefixRunner | None = None) -> Profile:
    """Measure (or reuse from ``store``) S for every gene and bit-width and return the profile."""
    bits = parse_bits(bits)
    started = time.perf_counter()
    inv, key = setup.inventory, setup.key
    total = len(inv.genes) * len(bits)
    known: dict[tuple[int, int], float] = {}
    stored_header = store.header(key) if store is not None else None
    if stored_header is not None:
        known = {k: v for k, v in store.entries(key).items() if k[1] in bits}
    if runner is None and (len(known) < total or stored_header is None):
        runner = PrefixRunner(setup.loaded.model, inv, setup.tokens.calibration, reuse_prefix=reuse_prefix)
    base_loss = runner.base_loss if runner is not None else float(stored_header["base_loss"])
    header = {
        "model_id": setup.loaded.model_id, "model_fingerprint": setup.loaded.fingerprint,
        "corpus_source": setup.tokens.source, "corpus_fingerprint": setup.tokens.fingerprint,
        "calibration_tokens": setup.tokens.calibration_tokens, "quantizer": setup.quantizer.settings(),
        "granularity": inv.granularity, "metric": setup.metric, "gene_names": inv.gene_names(),
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

    def on_gene(i: int, values: dict[int, float]) -> None:
        nonlocal done
        if store is not None:
            store.add_entries(key, {(i, b): v for b, v in values.items()})
        with lock:
            for b, v in values.items():
                done += 1
                emit("entry", gene_index=i, gene=inv.genes[i].name, bits=b, value=v)

    skip = set(known)
    if setup.metric == "kl":
        measured = kl_sensitivity(runner, inv, setup.quantizer, bits, skip, on_gene, should_stop)
    else:
        measured = fisher_sensitivity(setup.loaded.model, inv, setup.quantizer, bits,
                                      setup.tokens.calibration, skip, on_gene, should_stop)
    values = {**known, **measured}
    table = np.array([[values[(i, b)] for b in bits] for i in range(len(inv.genes))], dtype=np.float64)
    profile = Profile(
        model_id=setup.loaded.model_id, model_fingerprint=setup.loaded.fingerprint,
        corpus_source=setup.tokens.source, corpus_fingerprint=setup.tokens.fingerprint,
        calibration_tokens=setup.tokens.calibration_tokens, quantizer=setup.quantizer.settings(),
        granularity=inv.granularity, metric=setup.metric, bits=bits, gene_names=inv.gene_names(),
        gene_blocks=[g.block for g in inv.genes], gene_params=[g.params for g in inv.genes],
        cost_bytes=inv.cost_table(setup.quantizer, bits), fixed_bytes=inv.fixed_bytes,
        base_loss=base_loss, sensitivity=table, seconds=time.perf_counter() - started,
        reused_entries=len(known),
    )
    emit("done")
    return profile


def load_profile(setup: ProfileSetup, bits: list[int], store) -> Profile | None:
    """The stored profile for ``setup`` if every (gene, bit) entry is there, else None."""
    header = store.header(setup.key)
    if header is None:
        return None
    entries = store.entries(setup.key)
    bits = parse_bits(bits)
    if any((i, b) not in entries for i in range(len(setup.inventory.genes)) for b in bits):
        return None
    return run_profile(setup, bits, store)
