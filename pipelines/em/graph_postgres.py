"""The region graph in PostgreSQL (psycopg 3, the optional ``psc[cluster]`` extra): for
runs whose workers are on other hosts, where SQLite's WAL (shared memory, one host)
cannot be shared.

Each run keeps its tables in a PostgreSQL schema of its own (``graph_url`` names it and
records it in the run's URL), so one database holds many runs and ``--force`` drops
exactly one run's tables. The tables are :data:`graph.SCHEMA`'s, created under an
advisory lock: ``CREATE ... IF NOT EXISTS`` is not safe against itself when many
workers open a fresh run at once.

Writes go through binary ``COPY ... FROM STDIN``, built from numpy arrays without a
Python object per row; reads through a server-side cursor with binary rows fetched
``CHUNK_ROWS`` at a time, so neither the server's result nor the client's rows need the
whole table in memory at once.
"""

from __future__ import annotations

import struct
import uuid
from typing import Sequence

import numpy as np

from .graph import CHUNK_ROWS, SCHEMA, TABLES, RegionGraph, rows_to_array

_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_COPY_TRAILER = struct.pack(">h", -1)
_WIRE = {"i": ">i8", "f": ">f8"}  # BIGINT, DOUBLE PRECISION in COPY's binary format


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def copy_records(columns: dict[str, np.ndarray]) -> bytes:
    """The rows of ``columns`` (int64 or float64 arrays, no NULLs) in COPY's binary
    format: per row a field count, then per field its length and big-endian value."""
    n = len(next(iter(columns.values())))
    fields = [("count", ">i2")]
    for index, values in enumerate(columns.values()):
        fields += [(f"length{index}", ">i4"), (f"value{index}", _WIRE[values.dtype.kind])]
    records = np.empty(n, dtype=fields)
    records["count"] = len(columns)
    for index, values in enumerate(columns.values()):
        records[f"length{index}"] = 8
        records[f"value{index}"] = values
    return records.tobytes()


class PostgresGraph(RegionGraph):
    """One connection per process (autocommit; each write is its own transaction)."""

    paramstyle = "%s"

    def __init__(self, conninfo: str, schema: str, connect_timeout: int = 10) -> None:
        import psycopg

        self.schema = schema
        self.connection = psycopg.connect(conninfo, autocommit=True, connect_timeout=connect_timeout,
                                          application_name="psc")
        with self.connection.transaction():
            # one creator at a time: concurrent CREATE ... IF NOT EXISTS can collide
            self.connection.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (schema,))
            self.connection.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_identifier(schema)}")
            self.connection.execute(f"SET search_path TO {quote_identifier(schema)}")
            for statement in SCHEMA:
                self.connection.execute(statement)
            # lookup tables are uint64 bytes that do not compress: storing them uncompressed
            # (EXTERNAL) makes writing nine 2.2 * 10^6-fragment tables 7x faster (30 s -> 4 s).
            # Altered once, when the table is new (ALTER takes an exclusive lock).
            compressed = self.connection.execute(
                "SELECT count(*) FROM pg_attribute WHERE attrelid = 'lookup_parts'::regclass "
                "AND attname IN ('fragments', 'segments') AND attstorage <> 'e'").fetchone()[0]
            if compressed:
                for column in ("fragments", "segments"):
                    self.connection.execute(f"ALTER TABLE lookup_parts ALTER COLUMN {column} SET STORAGE EXTERNAL")

    def close(self) -> None:
        self.connection.close()

    def clear(self) -> None:
        self.connection.execute(f"DROP SCHEMA IF EXISTS {quote_identifier(self.schema)} CASCADE")

    def _replace(self, table: str, key: str, value, columns: dict[str, np.ndarray]) -> None:
        # NaN in a float column is NULL: rows are copied in groups by which columns are
        # NULL, each group naming only its other columns (the rest default to NULL)
        nulls = {name: np.isnan(values) for name, values in columns.items() if values.dtype.kind == "f"}
        pattern = np.zeros(len(next(iter(columns.values()))), np.int64)
        for bit, mask in enumerate(nulls.values()):
            pattern |= mask.astype(np.int64) << bit
        with self.connection.transaction(), self.connection.cursor() as cursor:
            cursor.execute(f"DELETE FROM {table} WHERE {key} = %s", (value,))
            for code in np.unique(pattern):
                rows = pattern == code
                null = {name for bit, name in enumerate(nulls) if code >> bit & 1}
                chosen = {name: values[rows] for name, values in columns.items() if name not in null}
                with cursor.copy(f"COPY {table} ({', '.join(chosen)}) FROM STDIN (FORMAT BINARY)") as copy:
                    copy.write(_COPY_HEADER)
                    for start in range(0, int(rows.sum()), CHUNK_ROWS):
                        copy.write(copy_records({name: values[start:start + CHUNK_ROWS]
                                                 for name, values in chosen.items()}))
                    copy.write(_COPY_TRAILER)

    def _replace_rows(self, table: str, key: str, value, names: Sequence[str], rows: list[tuple]) -> None:
        with self.connection.transaction(), self.connection.cursor() as cursor:
            cursor.execute(f"DELETE FROM {table} WHERE {key} = %s", (value,))
            cursor.executemany(f"INSERT INTO {table} ({', '.join(names)}) VALUES "
                               f"({', '.join(['%s'] * len(names))})", rows)

    def _fetch_rows(self, sql: str, params: Sequence = ()) -> list[tuple]:
        with self.connection.cursor(binary=True) as cursor:
            return cursor.execute(sql, tuple(params)).fetchall()

    def _select(self, sql: str, dtype: np.dtype, params: Sequence = ()) -> np.ndarray:
        with self.connection.transaction():  # a server-side cursor lives in a transaction
            with self.connection.cursor(name=f"psc_{uuid.uuid4().hex}", binary=True) as cursor:
                cursor.execute(sql, tuple(params))

                def chunks():
                    while rows := cursor.fetchmany(CHUNK_ROWS):
                        yield rows

                return rows_to_array(chunks(), dtype)


def table_counts(connection, schema: str) -> dict[str, int]:
    """Rows per table of a run's schema (for tests and for telling a user what is there)."""
    return {table: connection.execute(f"SELECT COUNT(*) FROM {quote_identifier(schema)}.{table}").fetchone()[0]
            for table in TABLES}
