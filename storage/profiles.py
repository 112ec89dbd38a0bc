"""Persisting sensitivity profiles in the same database as the studies.

Two tables: ``empas_profiles`` (one row per profile key: model, corpus, quantiser, granularity,
metric, plus a JSON header: genes, base loss) and ``empas_profile_cells`` (one row per gene and qtype:
the measured value and the seconds it took). Cells are committed gene by gene, so a profiling run that
is killed half-way resumes from the finished genes, and asking for more qtypes later measures only the
new ones. Rows of tables from older EMPAS versions (``empas_profile_entries``) are left alone.
"""

from __future__ import annotations

import json
import time

from sqlalchemy import (Column, Float, ForeignKey, Integer, MetaData, String, Table, Text, UniqueConstraint, func,
                        select)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from .database import storage_error

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


class ProfileStore:
    """The profile tables of one :class:`storage.database.Database`."""

    def __init__(self, database):
        self.url = database.url
        self.engine = database.engine
        self._tables = False

    def _readable(self) -> bool:
        """Whether the tables exist: reading a storage that never held a profile creates nothing (the
        studies list and the TUI open databases they must not change)."""
        if not self._tables:
            from sqlalchemy import inspect

            self._tables = all(inspect(self.engine).has_table(t.name) for t in metadata.sorted_tables)
        return self._tables

    def _writable(self) -> None:
        """Create the tables before the first write."""
        if self._tables:
            return
        try:
            self._create_tables()
        except SQLAlchemyError as exc:
            raise storage_error(self.url, exc) from None
        self._tables = True

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

    def add_entries(self, key: str, values: dict[tuple[int, str], float], seconds: float = 0.0) -> None:
        """Commit one gene's results atomically (all its qtypes, or none); ``seconds`` per cell."""
        if not values:
            return
        self._writable()
        existing = self.entries(key)
        rows = [{"profile_key": key, "gene_index": g, "qtype": str(q), "value": v, "seconds": float(seconds)}
                for (g, q), v in values.items() if (g, q) not in existing]
        if rows:
            try:
                with self.engine.begin() as conn:
                    conn.execute(cells_table.insert(), rows)
            except IntegrityError:  # another worker wrote the same entries first: theirs are as good
                pass

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
