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
    """CREATE TABLE IF NOT EXISTS segments (
        threshold DOUBLE PRECISION NOT NULL, fragment BIGINT NOT NULL,
        segment BIGINT NOT NULL, PRIMARY KEY (threshold, fragment))""",
)
TABLES = ("fragments", "edges", "segments")
CHUNK_ROWS = 1_000_000  # rows per fetch: bounded memory for the driver's row objects

# The columns of each read, as numpy dtypes. merge_score may be NULL (never merged): it is
# read as (is-null flag, value or 0), so that no read needs a driver-level None.
FRAGMENT_IDS = ("SELECT id FROM fragments ORDER BY id", np.dtype([("id", "i8")]))
EDGES = ("SELECT u, v, merge_score IS NULL, COALESCE(merge_score, 0) FROM edges",
         np.dtype([("u", "i8"), ("v", "i8"), ("never", "?"), ("score", "f8")]))
LOOKUP = ("SELECT fragment, segment FROM segments WHERE threshold = {mark} ORDER BY fragment",
          np.dtype([("fragment", "i8"), ("segment", "i8")]))


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
        """Replace the lookup table of ``threshold``."""
        fragments = np.asarray(fragments).astype(np.int64)
        columns = {"threshold": np.full(len(fragments), float(threshold)), "fragment": fragments,
                   "segment": np.asarray(segments).astype(np.int64)}
        self._replace("segments", "threshold", float(threshold), columns)

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
            "SELECT DISTINCT threshold FROM segments ORDER BY threshold", np.dtype([("t", "f8")]))["t"]]

    def lookup(self, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """(fragment ids sorted, their segment ids) for a stored threshold."""
        sql, dtype = LOOKUP
        table = self._select(sql.format(mark=self.paramstyle), dtype, (float(threshold),))
        if not len(table):
            raise KeyError(f"no lookup table for threshold {threshold}")
        return table["fragment"].astype(np.uint64), table["segment"].astype(np.uint64)

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
        names = ", ".join(columns)
        marks = ", ".join("?" * len(columns))
        with closing(self.connection.cursor()) as cursor:
            cursor.execute("BEGIN IMMEDIATE")
            try:
                cursor.execute(f"DELETE FROM {table} WHERE {key} = ?", (value,))
                cursor.executemany(f"INSERT INTO {table} ({names}) VALUES ({marks})", _python_rows(columns))
                cursor.execute("COMMIT")
            except BaseException:
                cursor.execute("ROLLBACK")
                raise

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
