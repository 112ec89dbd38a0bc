"""Persisting sensitivity profiles in the same database as the studies.

Two tables: ``empas_profiles`` (one row per profile key: model, corpus, quantiser, granularity,
metric, plus the layout: genes, costs, base loss) and ``empas_profile_entries`` (one row per gene and
bit-width). Entries are committed gene by gene, so a profiling run that is killed half-way resumes
from the finished genes, and asking for more bit-widths later measures only the new ones.
"""

from __future__ import annotations

import json
import time

from sqlalchemy import (Column, Float, ForeignKey, Integer, MetaData, String, Table, Text, UniqueConstraint,
                        create_engine, select)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from .urls import StorageError, check_reachable, redact, resolve_storage_url

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

entries_table = Table(
    "empas_profile_entries", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("profile_key", String(64), ForeignKey("empas_profiles.key"), nullable=False),
    Column("gene_index", Integer, nullable=False),
    Column("bits", Integer, nullable=False),
    Column("value", Float, nullable=False),
    UniqueConstraint("profile_key", "gene_index", "bits", name="uq_profile_entry"),
)


class ProfileStore:
    def __init__(self, url: str | None = None):
        self.url = resolve_storage_url(url)
        check_reachable(self.url)
        kwargs = {"connect_args": {"timeout": 30}} if self.url.startswith("sqlite") else {}
        self.engine = create_engine(self.url, **kwargs)
        try:
            self._create_tables()
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot create EMPAS tables in {redact(self.url)}: "
                               f"{type(exc).__name__}; check write permission") from None

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
        with self.engine.connect() as conn:
            row = conn.execute(select(profiles_table.c.header_json).where(profiles_table.c.key == key)).first()
        return json.loads(row[0]) if row else None

    def ensure_header(self, key: str, header: dict) -> None:
        """Create the profile row once; concurrent creators are fine (the first one wins)."""
        if self.header(key) is not None:
            return
        try:
            with self.engine.begin() as conn:
                conn.execute(profiles_table.insert().values(
                    key=key, model_id=header["model_id"], model_fingerprint=header["model_fingerprint"],
                    corpus_fingerprint=header["corpus_fingerprint"], granularity=header["granularity"],
                    metric=header["metric"], header_json=json.dumps(header), created=time.time()))
        except IntegrityError:
            pass

    def entries(self, key: str) -> dict[tuple[int, int], float]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(entries_table.c.gene_index, entries_table.c.bits, entries_table.c.value)
                                .where(entries_table.c.profile_key == key)).all()
        return {(int(g), int(b)): float(v) for g, b, v in rows}

    def add_entries(self, key: str, values: dict[tuple[int, int], float]) -> None:
        """Commit one gene's results atomically (all its bit-widths, or none)."""
        if not values:
            return
        existing = self.entries(key)
        rows = [{"profile_key": key, "gene_index": g, "bits": b, "value": v}
                for (g, b), v in values.items() if (g, b) not in existing]
        if rows:
            try:
                with self.engine.begin() as conn:
                    conn.execute(entries_table.insert(), rows)
            except IntegrityError:  # another worker wrote the same entries first: theirs are as good
                pass

    def list_profiles(self) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(profiles_table.c.key, profiles_table.c.header_json)).all()
        out = []
        for key, header_json in rows:
            header = json.loads(header_json)
            header["key"] = key
            header["entries"] = len(self.entries(key))
            out.append(header)
        return out

    def close(self) -> None:
        self.engine.dispose()
