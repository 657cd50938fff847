"""The region graph of an EM run: fragments, scored edges and per-threshold lookup
tables, behind one interface (:class:`RegionGraph`) with two backends:

- :class:`GraphStore`, SQLite in WAL mode (the embedded default, ``OUT.zarr/graph.sqlite``):
  many worker processes of one machine write while others read. WAL needs shared memory
  on one host, so it is refused for workers on other hosts (``graph_url.check_shared``);
- ``graph_postgres.PostgresGraph``, PostgreSQL through psycopg 3 (``psc[cluster]``), for
  workers anywhere on a network.

Both create the same tables from :data:`SCHEMA`: plain SQL (``BIGINT``,
``DOUBLE PRECISION``) that SQLite and PostgreSQL accept as it is. Fragment ids are uint64
in the arrays and below 2**63 by construction (the block index in the high bits, see
``fragments.globalise``), so they fit ``BIGINT``. Which backend a run uses is its
recorded graph URL (``graph_url.open_run_graph``).

Each edge is written by exactly one block, the one that created its lower fragment, so
a block that is re-run after a crash replaces its own rows and nobody else's, in one
transaction. Reads and writes move numpy arrays in bulk (``CHUNK_ROWS`` rows at a time),
because the global merge reads every edge of the volume: 10^7 rows and more.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS fragments (
        id BIGINT PRIMARY KEY, block BIGINT NOT NULL, size BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS edges (
        u BIGINT NOT NULL, v BIGINT NOT NULL, block BIGINT NOT NULL,
        affinity DOUBLE PRECISION NOT NULL, merge_score DOUBLE PRECISION,
        PRIMARY KEY (u, v))""",
    "CREATE INDEX IF NOT EXISTS edges_block ON edges (block)",
    "CREATE INDEX IF NOT EXISTS fragments_block ON fragments (block)",
    # a lookup table in parts of LOOKUP_PART fragments: (fragment ids, segment ids) as
    # little-endian uint64 bytes; BYTEA is PostgreSQL's binary type, and SQLite stores
    # bytes as they are in a column of any declared type
    """CREATE TABLE IF NOT EXISTS lookup_parts (
        threshold DOUBLE PRECISION NOT NULL, part BIGINT NOT NULL,
        fragments BYTEA NOT NULL, segments BYTEA NOT NULL, PRIMARY KEY (threshold, part))""",
)
TABLES = ("fragments", "edges", "lookup_parts")
CHUNK_ROWS = 1_000_000  # rows per fetch: bounded memory for the driver's row objects
LOOKUP_PART = 1 << 20  # fragments per stored part of a lookup table (16 MiB a row)

# The columns of each read, as numpy dtypes. merge_score may be NULL (never merged): it is
# read as (is-null flag, value or 0), so that no read needs a driver-level None.
FRAGMENT_IDS = ("SELECT id FROM fragments ORDER BY id", np.dtype([("id", "i8")]))
EDGES = ("SELECT u, v, merge_score IS NULL, COALESCE(merge_score, 0) FROM edges",
         np.dtype([("u", "i8"), ("v", "i8"), ("never", "?"), ("score", "f8")]))
LOOKUP = "SELECT fragments, segments FROM lookup_parts WHERE threshold = {mark} ORDER BY part"


def edge_arrays(edges) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(u, v, affinity, merge_score with NaN for never-merged) from either what
    ``agglomerate.score_edges`` yields (tuples ``(u, v, affinity, merge_score or None)``)
    or four arrays of that order already."""
    if isinstance(edges, tuple) and len(edges) == 4 and all(isinstance(a, np.ndarray) for a in edges):
        u, v, affinity, score = edges
        return (np.asarray(u).astype(np.int64), np.asarray(v).astype(np.int64),
                np.asarray(affinity, np.float64), np.asarray(score, np.float64))
    rows = list(edges)
    if not rows:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0), np.zeros(0)
    table = np.array([(int(u), int(v), float(a), np.nan if m is None else float(m)) for u, v, a, m in rows],
                     dtype=[("u", "i8"), ("v", "i8"), ("a", "f8"), ("m", "f8")])
    return table["u"], table["v"], table["a"], table["m"]


class RegionGraph:
    """What every stage, the merge, psc-eval and the napari widget use. A backend
    implements the four primitives at the bottom; the rest is shared."""

    # --- the interface ----------------------------------------------------------------
    def write_fragments(self, block: int, ids: np.ndarray, sizes: np.ndarray) -> None:
        """Replace ``block``'s fragments with these."""
        ids = np.asarray(ids).astype(np.int64)
        columns = {"id": ids, "block": np.full(len(ids), block, np.int64),
                   "size": np.asarray(sizes).astype(np.int64)}
        self._replace("fragments", "block", block, columns)

    def write_edges(self, block: int, edges: Iterable[tuple[int, int, float, float | None]] | tuple) -> None:
        """Replace ``block``'s edges (``edge_arrays`` says what ``edges`` may be)."""
        u, v, affinity, score = edge_arrays(edges)
        columns = {"u": u, "v": v, "block": np.full(len(u), block, np.int64), "affinity": affinity,
                   "merge_score": score}  # NaN: NULL
        self._replace("edges", "block", block, columns)

    def write_lookup(self, threshold: float, fragments: np.ndarray, segments: np.ndarray) -> None:
        """Replace the lookup table of ``threshold``.

        Stored as a few rows of bytes, not a row per fragment: a volume's nine tables are
        nine times its fragments (2 * 10^7 rows for a 10^7-edge graph), which as rows
        took SQLite two minutes to write; as bytes they take about a second, and reading
        one back (each napari threshold change) is a copy."""
        fragments = np.asarray(fragments).astype("<u8")
        segments = np.asarray(segments).astype("<u8")
        if fragments.shape != segments.shape:
            raise ValueError("a lookup table needs one segment id per fragment id")
        rows = [(float(threshold), start // LOOKUP_PART, fragments[start:start + LOOKUP_PART].tobytes(),
                 segments[start:start + LOOKUP_PART].tobytes())
                for start in range(0, len(fragments), LOOKUP_PART)]
        self._replace_rows("lookup_parts", "threshold", float(threshold),
                           ("threshold", "part", "fragments", "segments"), rows)

    def fragment_ids(self) -> np.ndarray:
        """Every fragment id, sorted (uint64)."""
        return self._select(*FRAGMENT_IDS)["id"].astype(np.uint64)

    def edges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(u, v, merge_score) with never-merged edges as +inf."""
        table = self._select(*EDGES)
        score = table["score"].copy()
        score[table["never"]] = np.inf
        return table["u"].astype(np.uint64), table["v"].astype(np.uint64), score

    def thresholds(self) -> list[float]:
        return [float(t) for t in self._select(
            "SELECT DISTINCT threshold FROM lookup_parts ORDER BY threshold", np.dtype([("t", "f8")]))["t"]]

    def lookup(self, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """(fragment ids sorted, their segment ids) for a stored threshold."""
        rows = self._fetch_rows(LOOKUP.format(mark=self.paramstyle), (float(threshold),))
        if not rows:
            raise KeyError(f"no lookup table for threshold {threshold}")
        fragments = np.concatenate([np.frombuffer(bytes(f), "<u8") for f, _ in rows]).astype(np.uint64)
        segments = np.concatenate([np.frombuffer(bytes(s), "<u8") for _, s in rows]).astype(np.uint64)
        return fragments, segments

    def clear(self) -> None:
        """Drop every table of this graph (``--force``)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # --- what a backend implements -----------------------------------------------------
    paramstyle = "?"

    def _replace(self, table: str, key: str, value, columns: dict[str, np.ndarray]) -> None:
        """In one transaction: delete the rows of ``table`` whose ``key`` is ``value``,
        then insert ``columns`` (equal-length arrays; NaN in a float column is NULL)."""
        raise NotImplementedError

    def _select(self, sql: str, dtype: np.dtype, params: Sequence = ()) -> np.ndarray:
        """The rows of a query (no NULLs) as a structured array of ``dtype``."""
        raise NotImplementedError

    def _replace_rows(self, table: str, key: str, value, names: Sequence[str], rows: list[tuple]) -> None:
        """Like ``_replace``, for a few rows of Python values (bytes among them)."""
        raise NotImplementedError

    def _fetch_rows(self, sql: str, params: Sequence = ()) -> list[tuple]:
        """All rows of a query that returns few (bytes values as bytes or memoryview)."""
        raise NotImplementedError


def _python_rows(columns: dict[str, np.ndarray]) -> Iterable[tuple]:
    """Rows of Python scalars for a DB-API ``executemany`` (``tolist`` converts a whole
    column at C speed; NaN becomes None, i.e. NULL)."""
    lists = []
    for values in columns.values():
        listed = values.tolist()
        if values.dtype.kind == "f" and np.isnan(values).any():
            listed = [None if x != x else x for x in listed]
        lists.append(listed)
    return zip(*lists)


def rows_to_array(chunks: Iterable[list[tuple]], dtype: np.dtype) -> np.ndarray:
    """Concatenate fetched row chunks into one structured array."""
    parts = [np.array(chunk, dtype=dtype) for chunk in chunks if chunk]
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


class GraphStore(RegionGraph):
    """SQLite (WAL mode): one connection per process; every block writes in one
    transaction. Constructed with the database file's path (``layout.graph_path``)."""

    paramstyle = "?"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.connection = sqlite3.connect(self.path, timeout=600, isolation_level=None)
        self.connection.execute("PRAGMA journal_mode=WAL")
        self.connection.execute("PRAGMA synchronous=NORMAL")
        for statement in SCHEMA:
            self.connection.execute(statement)

    def close(self) -> None:
        self.connection.close()

    def clear(self) -> None:
        for table in TABLES:
            self.connection.execute(f"DROP TABLE IF EXISTS {table}")

    def _replace(self, table: str, key: str, value, columns: dict[str, np.ndarray]) -> None:
        self._replace_rows(table, key, value, tuple(columns), _python_rows(columns))

    def _replace_rows(self, table: str, key: str, value, names: Sequence[str], rows: Iterable[tuple]) -> None:
        marks = ", ".join("?" * len(names))
        with closing(self.connection.cursor()) as cursor:
            cursor.execute("BEGIN IMMEDIATE")
            try:
                cursor.execute(f"DELETE FROM {table} WHERE {key} = ?", (value,))
                cursor.executemany(f"INSERT INTO {table} ({', '.join(names)}) VALUES ({marks})", rows)
                cursor.execute("COMMIT")
            except BaseException:
                cursor.execute("ROLLBACK")
                raise

    def _fetch_rows(self, sql: str, params: Sequence = ()) -> list[tuple]:
        with closing(self.connection.cursor()) as cursor:
            return cursor.execute(sql, tuple(params)).fetchall()

    def _select(self, sql: str, dtype: np.dtype, params: Sequence = ()) -> np.ndarray:
        with closing(self.connection.cursor()) as cursor:
            cursor.execute(sql, tuple(params))

            def chunks():
                while rows := cursor.fetchmany(CHUNK_ROWS):
                    yield rows

            return rows_to_array(chunks(), dtype)


def apply_lookup(fragments: np.ndarray, ids: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """Map fragment ids through a sorted lookup table; unknown ids (and 0) become 0."""
    flat = fragments.ravel()
    position = np.searchsorted(ids, flat)
    position = np.clip(position, 0, max(len(ids) - 1, 0))
    found = (ids[position] == flat) if len(ids) else np.zeros(flat.shape, bool)
    out = np.where(found, segments[position] if len(ids) else 0, 0).astype(np.uint64)
    return out.reshape(fragments.shape)
