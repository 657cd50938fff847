"""The region graph of an EM run: fragments, scored edges and per-threshold lookup
tables, in SQLite (WAL mode, so many workers write while others read).

The schema is plain SQL (``BIGINT``, ``DOUBLE PRECISION``, ``ON CONFLICT``) that
PostgreSQL accepts as it is; on a cluster, the same statements run through a PostgreSQL
driver with ``%s`` placeholders (``paramstyle``). Fragment ids are uint64 in the arrays
and below 2**63 by construction (the block index in the high bits, see
``fragments.globalise``), so they fit ``BIGINT``.

Each edge is written by exactly one block, the one that created its lower fragment, so
a block that is re-run after a crash replaces its own rows and nobody else's.
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


class GraphStore:
    """One connection per process; every block writes in one transaction."""

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

    def _replace_block(self, table: str, block: int, rows: Sequence[tuple], columns: str) -> None:
        marks = ", ".join([self.paramstyle] * len(columns.split(",")))
        with closing(self.connection.cursor()) as cursor:
            cursor.execute("BEGIN IMMEDIATE")
            try:
                cursor.execute(f"DELETE FROM {table} WHERE block = {self.paramstyle}", (block,))
                cursor.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", rows)
                cursor.execute("COMMIT")
            except BaseException:
                cursor.execute("ROLLBACK")
                raise

    def write_fragments(self, block: int, ids: np.ndarray, sizes: np.ndarray) -> None:
        rows = [(int(i), block, int(s)) for i, s in zip(ids, sizes)]
        self._replace_block("fragments", block, rows, "id, block, size")

    def write_edges(self, block: int, edges: Iterable[tuple[int, int, float, float | None]]) -> None:
        rows = [(int(u), int(v), block, float(a), None if m is None else float(m)) for u, v, a, m in edges]
        self._replace_block("edges", block, rows, "u, v, block, affinity, merge_score")

    def fragment_ids(self) -> np.ndarray:
        rows = self.connection.execute("SELECT id FROM fragments ORDER BY id").fetchall()
        return np.array([r[0] for r in rows], dtype=np.uint64)

    def edges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(u, v, merge_score) with never-merged edges as +inf."""
        rows = self.connection.execute("SELECT u, v, merge_score FROM edges").fetchall()
        u = np.array([r[0] for r in rows], dtype=np.uint64)
        v = np.array([r[1] for r in rows], dtype=np.uint64)
        score = np.array([np.inf if r[2] is None else r[2] for r in rows], dtype=np.float64)
        return u, v, score

    def write_lookup(self, threshold: float, fragments: np.ndarray, segments: np.ndarray) -> None:
        with closing(self.connection.cursor()) as cursor:
            cursor.execute("BEGIN IMMEDIATE")
            cursor.execute(f"DELETE FROM segments WHERE threshold = {self.paramstyle}", (threshold,))
            cursor.executemany(
                "INSERT INTO segments (threshold, fragment, segment) VALUES (?, ?, ?)",
                ((threshold, int(f), int(s)) for f, s in zip(fragments, segments)),
            )
            cursor.execute("COMMIT")

    def thresholds(self) -> list[float]:
        rows = self.connection.execute("SELECT DISTINCT threshold FROM segments ORDER BY threshold")
        return [r[0] for r in rows]

    def lookup(self, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """(fragment ids sorted, their segment ids) for a stored threshold."""
        rows = self.connection.execute(
            "SELECT fragment, segment FROM segments WHERE threshold = ? ORDER BY fragment", (threshold,)
        ).fetchall()
        if not rows:
            raise KeyError(f"no lookup table for threshold {threshold}")
        fragments = np.array([r[0] for r in rows], dtype=np.uint64)
        segments = np.array([r[1] for r in rows], dtype=np.uint64)
        return fragments, segments


def apply_lookup(fragments: np.ndarray, ids: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """Map fragment ids through a sorted lookup table; unknown ids (and 0) become 0."""
    flat = fragments.ravel()
    position = np.searchsorted(ids, flat)
    position = np.clip(position, 0, max(len(ids) - 1, 0))
    found = (ids[position] == flat) if len(ids) else np.zeros(flat.shape, bool)
    out = np.where(found, segments[position] if len(ids) else 0, 0).astype(np.uint64)
    return out.reshape(fragments.shape)
