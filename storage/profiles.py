"""Persisting sensitivity profiles in the same database as the studies.

Two tables: ``empas_profiles`` (one row per profile key: model, corpus, quantiser, granularity,
metric, plus a JSON header: genes, base loss) and ``empas_profile_cells`` (one row per gene and qtype:
the measured value and the seconds it took). Cells are committed gene by gene, so a profiling run that
is killed half-way resumes from the finished genes, and asking for more qtypes later measures only the
new ones. Rows of tables from older EMPAS versions (``empas_profile_entries``) are left alone.

A third, ``empas_profile_claims``, lets several workers share one profile (docs/workers.md): a worker
claims a gene (one row, unique per profile and gene) before measuring it, renews the claim while it
works and deletes it once the gene's cells are committed. A claim whose ``expires`` has passed belongs
to a dead worker and is deleted by the next claimer. Times are the claimer's clock (``time.time()``):
machines sharing a PostgreSQL need clocks that agree to well within the TTL (NTP does).
"""

from __future__ import annotations

import json
import time

from sqlalchemy import (Column, Float, ForeignKey, Integer, MetaData, String, Table, Text, UniqueConstraint, func,
                        select)
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

from .errors import storage_error
from .workers import worker_is_dead_here

metadata = MetaData()

profiles_table = Table(
    "empas_profiles", metadata,
    Column("key", String(64), primary_key=True),
    Column("model_id", Text, nullable=False),
    Column("model_fingerprint", String(64), nullable=False),
    Column("corpus_fingerprint", String(64), nullable=False),
    Column("granularity", String(16), nullable=False),
    Column("metric", String(16), nullable=False),
    Column("header_json", Text, nullable=False),
    Column("created", Float, nullable=False),
)

cells_table = Table(
    "empas_profile_cells", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("profile_key", String(64), ForeignKey("empas_profiles.key"), nullable=False),
    Column("gene_index", Integer, nullable=False),
    Column("qtype", String(16), nullable=False),
    Column("value", Float, nullable=False),
    Column("seconds", Float, nullable=False, default=0.0),
    UniqueConstraint("profile_key", "gene_index", "qtype", name="uq_profile_cell"),
)


claims_table = Table(
    "empas_profile_claims", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("profile_key", String(64), nullable=False),
    Column("gene_index", Integer, nullable=False),
    Column("worker", String(128), nullable=False),
    Column("expires", Float, nullable=False),
    UniqueConstraint("profile_key", "gene_index", name="uq_profile_claim"),
)

DATA_TABLES = (profiles_table, cells_table)  # what a reader needs; claims are created by the first claimer

class ProfileStore:
    """The profile tables of one :class:`storage.database.Database`."""

    def __init__(self, database):
        self.url = database.url
        self.engine = database.engine
        self._tables = False  # the profile and cell tables exist
        self._claims = False  # the claims table exists
        self._created = False  # this process ran create_all (every table exists)

    def _readable(self) -> bool:
        """Whether the tables exist: reading a storage that never held a profile creates nothing (the
        studies list and the TUI open databases they must not change)."""
        if not self._tables:
            from sqlalchemy import inspect

            self._tables = all(inspect(self.engine).has_table(t.name) for t in DATA_TABLES)
        return self._tables

    def _claims_readable(self) -> bool:
        if not self._claims:
            from sqlalchemy import inspect

            self._claims = inspect(self.engine).has_table(claims_table.name)
        return self._claims

    def _writable(self) -> None:
        """Create the tables before the first write (those missing: a database of an older EMPAS has
        the profile tables but not the claims)."""
        if self._created:
            return
        try:
            self._create_tables()
        except SQLAlchemyError as exc:
            raise storage_error(self.url, exc) from None
        self._created = self._tables = self._claims = True

    def _create_tables(self, attempts: int = 3) -> None:
        """Create the tables; another process creating them at the same moment is not an error."""
        for attempt in range(attempts):
            try:
                metadata.create_all(self.engine)
                return
            except SQLAlchemyError:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def header(self, key: str) -> dict | None:
        if not self._readable():
            return None
        with self.engine.connect() as conn:
            row = conn.execute(select(profiles_table.c.header_json).where(profiles_table.c.key == key)).first()
        return json.loads(row[0]) if row else None

    def ensure_header(self, key: str, header: dict) -> None:
        """Create the profile row once; concurrent creators are fine (the first one wins)."""
        if self.header(key) is not None:
            return
        self._writable()
        try:
            with self.engine.begin() as conn:
                conn.execute(profiles_table.insert().values(
                    key=key, model_id=header["model_id"], model_fingerprint=header["model_fingerprint"],
                    corpus_fingerprint=header["corpus_fingerprint"], granularity=header["granularity"],
                    metric=header["metric"], header_json=json.dumps(header), created=time.time()))
        except IntegrityError:
            pass

    def entries(self, key: str) -> dict[tuple[int, str], float]:
        if not self._readable():
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(select(cells_table.c.gene_index, cells_table.c.qtype, cells_table.c.value)
                                .where(cells_table.c.profile_key == key)).all()
        return {(int(g), str(q)): float(v) for g, q, v in rows}

    def measured_seconds(self, key: str) -> float:
        """Seconds spent measuring every stored cell of the profile, by whichever run measured it."""
        if not self._readable():
            return 0.0
        with self.engine.connect() as conn:
            total = conn.execute(select(func.sum(cells_table.c.seconds))
                                 .where(cells_table.c.profile_key == key)).scalar()
        return float(total or 0.0)

    def add_entries(self, key: str, values: dict[tuple[int, str], float], seconds: float = 0.0,
                    release: tuple[int, str] | None = None) -> None:
        """Commit one gene's results atomically (all its qtypes, or none); ``seconds`` per cell.
        ``release``: the (gene, worker) claim deleted in the same transaction, so a claim that exists
        always means its gene's cells are not stored yet."""
        if not values:
            return
        self._writable()
        existing = self.entries(key)
        rows = [{"profile_key": key, "gene_index": g, "qtype": str(q), "value": v, "seconds": float(seconds)}
                for (g, q), v in values.items() if (g, q) not in existing]
        if not rows and release is None:
            return
        try:
            with self.engine.begin() as conn:
                if rows:
                    conn.execute(cells_table.insert(), rows)
                if release is not None:
                    conn.execute(claims_table.delete().where(*self._claim_match(key, *release)))
        except IntegrityError:  # another worker wrote the same entries first: theirs are as good
            if release is not None:
                self.release(key, *release)

    def drop_cells(self, key: str, cells) -> None:
        """Delete stored cells of a profile (skip markers that no longer hold, so they are measured)."""
        cells = list(cells)
        if not cells or not self._readable():
            return
        with self.engine.begin() as conn:
            for g, q in cells:
                conn.execute(cells_table.delete().where((cells_table.c.profile_key == key)
                                                        & (cells_table.c.gene_index == int(g))
                                                        & (cells_table.c.qtype == str(q))))

    def list_profiles(self) -> list[dict]:
        if not self._readable():
            return []
        with self.engine.connect() as conn:
            rows = conn.execute(select(profiles_table.c.key, profiles_table.c.header_json)).all()
            counts = dict(conn.execute(select(cells_table.c.profile_key, func.count(cells_table.c.id))
                                       .group_by(cells_table.c.profile_key)).all())
        out = []
        for key, header_json in rows:
            header = json.loads(header_json)
            header["key"] = key
            header["entries"] = int(counts.get(key, 0))
            out.append(header)
        return out

    # -- claims: several workers on one profile ----------------------------------------------------

    def claims(self, key: str) -> dict[int, tuple[str, float]]:
        """gene index -> (worker, expires) of every claim on the profile, live or expired."""
        if not self._claims_readable():
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(select(claims_table.c.gene_index, claims_table.c.worker, claims_table.c.expires)
                                .where(claims_table.c.profile_key == key)).all()
        return {int(g): (str(w), float(e)) for g, w, e in rows}

    def claim(self, key: str, gene: int, worker: str, ttl: float, now: float | None = None) -> bool:
        """Claim ``gene`` for ``worker`` for ``ttl`` seconds; False when another worker holds it.

        Expired claims of the profile are deleted first (their workers are dead or lost), and so are
        claims of workers that ran on this machine and whose process is gone; the insert then succeeds
        for exactly one of the workers racing for the gene (the unique key decides)."""
        self._writable()
        now = time.time() if now is None else now
        dead = [(g, w) for g, (w, e) in self.claims(key).items() if e > now and worker_is_dead_here(w)]
        try:
            with self.engine.begin() as conn:
                conn.execute(claims_table.delete().where(claims_table.c.profile_key == key)
                             .where(claims_table.c.expires <= now))
                for g, w in dead:
                    conn.execute(claims_table.delete().where(claims_table.c.profile_key == key)
                                 .where(claims_table.c.gene_index == g).where(claims_table.c.worker == w))
                conn.execute(claims_table.insert().values(profile_key=key, gene_index=int(gene), worker=worker,
                                                          expires=now + ttl))
        except IntegrityError:
            return False
        except OperationalError as exc:  # PostgreSQL: two claimers deleting the same expired rows
            if "deadlock" in str(exc).lower():
                return False
            raise
        return True

    @staticmethod
    def _claim_match(key: str, gene: int, worker: str):
        """Where-clauses of ``worker``'s claim on ``gene``."""
        return (claims_table.c.profile_key == key, claims_table.c.gene_index == int(gene),
                claims_table.c.worker == worker)

    def renew(self, key: str, gene: int, worker: str, ttl: float) -> bool:
        """Push the claim's expiry ``ttl`` seconds ahead; False when the worker no longer holds it
        (it expired and another worker took the gene)."""
        with self.engine.begin() as conn:
            n = conn.execute(claims_table.update().where(*self._claim_match(key, gene, worker))
                             .values(expires=time.time() + ttl)).rowcount
        return n == 1

    def release(self, key: str, gene: int, worker: str) -> None:
        """Delete the worker's claim on ``gene`` (when it stops before the gene's cells are stored)."""
        if not self._claims_readable():
            return
        with self.engine.begin() as conn:
            conn.execute(claims_table.delete().where(*self._claim_match(key, gene, worker)))
