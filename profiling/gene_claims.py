"""Genes shared by several profiling workers through the claims of one profile store.

Each (gene, qtype) measurement is independent, so N processes with the same settings and storage can
split a profile: a worker claims a gene nobody measured or holds, measures it, commits its cells and
releases the claim; when every missing gene is held by someone else it waits for them, and takes over
a gene whose claim expired (its worker died). Every worker ends when every cell is stored, and builds
the same profile from the store. One worker with a store runs the same loop (it simply never waits),
so a TUI and a CLI started on one storage share the work too. docs/workers.md has the user's side.

The choice of the next gene is a pure function (:func:`claimable_genes`); :class:`ClaimedGenes` does
the I/O around it: reading the store, claiming, renewing the claim from a background thread while the
gene is measured, and reporting the cells other workers stored as they arrive.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterator, Mapping, Sequence

from .profile import ProfileCancelled

log = logging.getLogger(__name__)

Cell = tuple[int, str]  # (gene index, qtype)

POLL_SECONDS = 1.0  # how often a worker looks for other workers' cells, and for free genes while it waits


def missing_cells(needed: Sequence[Sequence[Cell]], stored) -> list[list[Cell]]:
    """Per gene, the needed cells not in ``stored``."""
    return [[c for c in cells if c not in stored] for cells in needed]


def claimable_genes(missing: Sequence[Sequence[Cell]], held) -> list[int]:
    """The genes a worker may claim, in gene order: some cell is missing and no other live worker
    holds the gene. Workers racing for the first one are sorted out by the store's unique key."""
    return [i for i, cells in enumerate(missing) if cells and i not in held]


def live_foreign_claims(claims: Mapping[int, tuple[str, float]], worker: str, now: float,
                        is_dead: Callable[[str], bool]) -> set[int]:
    """The genes other workers hold now: claims not expired, not ours, of workers not known dead."""
    return {g for g, (w, expires) in claims.items() if expires > now and w != worker and not is_dead(w)}


class ClaimedGenes:
    """An iterable of ``(gene index, cells to measure)`` for ``kl_sensitivity`` / ``fisher_sensitivity``.

    Each gene is claimed in ``store`` before it is yielded; the consumer's ``on_gene`` stores its cells
    with :meth:`commit`, which releases the claim in the same transaction (a gene the consumer yields
    nothing for is released when it asks for the next). While nothing is claimable it polls every
    ``poll_seconds`` until every needed cell is stored. ``on_remote(cells)`` gets the cells other
    workers stored, once each, from whichever thread saw them; ``on_claim(gene)`` / ``on_wait(held)``
    report what the worker does.
    Call :meth:`close` when done (it releases a claim still held and stops the background thread)."""

    def __init__(self, store, key: str, needed: Sequence[Sequence[Cell]], seen, ttl: float, worker: str | None = None,
                 poll_seconds: float = POLL_SECONDS,
                 on_remote: Callable[[dict[Cell, float]], None] | None = None,
                 on_claim: Callable[[int], None] | None = None,
                 on_wait: Callable[[int], None] | None = None,
                 should_stop: Callable[[], bool] | None = None):
        from storage.workers import new_worker_id

        self.store, self.key, self.needed, self.ttl = store, key, [list(c) for c in needed], float(ttl)
        self.worker = worker or new_worker_id()
        self.poll_seconds = float(poll_seconds)
        self.on_remote, self.on_claim, self.on_wait, self.should_stop = on_remote, on_claim, on_wait, should_stop
        self._wanted = {c for cells in self.needed for c in cells}
        self._seen = set(seen)  # cells reported already: stored before the start, measured here, or remote
        self._lock = threading.Lock()
        self._current: int | None = None  # the gene this worker holds
        self._renewed = 0.0
        self._closed = threading.Event()
        self._keeper: threading.Thread | None = None
        self.remote = 0  # cells other workers stored while this one ran

    # -- the store ----------------------------------------------------------------------------------

    def refresh(self) -> dict[Cell, float]:
        """The needed cells stored now; reports those no one reported yet as remote."""
        stored = {c: v for c, v in self.store.entries(self.key).items() if c in self._wanted}
        with self._lock:
            new = {c: v for c, v in stored.items() if c not in self._seen}
            self._seen.update(new)
            self.remote += len(new)
        if new and self.on_remote:
            self.on_remote(dict(sorted(new.items())))
        return stored

    def commit(self, gene: int, cells: dict[Cell, float], seconds: float) -> set[Cell]:
        """Store the cells this worker measured of the gene it holds and release its claim, in one
        transaction; returns the cells not seen before (a gene taken over from a lost claim may have
        been stored by its first worker meanwhile: the first commit wins)."""
        with self._lock:
            fresh = set(cells) - self._seen
            self._seen.update(fresh)  # before the commit: the keeper must never report them as remote
            held = self._current == gene
            if held:
                self._current = None
        self.store.add_entries(self.key, cells, seconds=seconds, release=(gene, self.worker) if held else None)
        return fresh

    # -- the loop -----------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[int, list[Cell]]]:
        from storage.workers import worker_is_dead_here

        waiting = False
        while True:
            missing = missing_cells(self.needed, self.refresh())
            if not any(missing):
                return
            held = live_foreign_claims(self.store.claims(self.key), self.worker, time.time(), worker_is_dead_here)
            for gene in claimable_genes(missing, held):
                if not self.store.claim(self.key, gene, self.worker, self.ttl):
                    continue  # another worker got it first
                waiting = False
                self._hold(gene)
                try:
                    cells = missing_cells([self.needed[gene]], self.refresh())[0]  # it may have finished it
                    if cells:
                        if self.on_claim:
                            self.on_claim(gene)
                        yield gene, cells
                finally:
                    self._release()
                break
            else:
                if not waiting and self.on_wait:
                    self.on_wait(len(held))
                waiting = True
                self._sleep(self.poll_seconds)

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.should_stop and self.should_stop():
                raise ProfileCancelled("profiling cancelled")
            time.sleep(min(0.1, max(deadline - time.monotonic(), 0.0)))

    def _hold(self, gene: int) -> None:
        with self._lock:
            self._current, self._renewed = gene, time.monotonic()
        if self._keeper is None:
            self._keeper = threading.Thread(target=self._keep, name="empas-claim-keeper", daemon=True)
            self._keeper.start()

    def _release(self) -> None:
        with self._lock:
            gene, self._current = self._current, None
        if gene is not None:
            self.store.release(self.key, gene, self.worker)

    def _keep(self) -> None:
        """Background: renew the held claim every quarter TTL; report other workers' cells meanwhile."""
        while not self._closed.wait(min(self.poll_seconds, self.ttl / 4)):
            try:
                with self._lock:
                    gene, due = self._current, time.monotonic() - self._renewed >= self.ttl / 4
                if gene is not None and due:
                    if not self.store.renew(self.key, gene, self.worker, self.ttl):
                        log.warning("the claim on gene %d expired and was taken over; its cells are stored once "
                                    "(the first commit wins)", gene)
                    with self._lock:
                        self._renewed = time.monotonic()
                self.refresh()
            except Exception:  # noqa: BLE001 - a failed poll must not kill the worker; the main loop sees real failures
                log.debug("claim keeper poll failed", exc_info=True)

    def close(self) -> None:
        """Stop the background thread and release a claim still held (a cancelled or failed gene)."""
        self._closed.set()
        if self._keeper is not None:
            self._keeper.join(timeout=10)
        try:
            self._release()
        except Exception:  # noqa: BLE001 - the claim then expires on its own
            log.debug("releasing the claim failed", exc_info=True)
