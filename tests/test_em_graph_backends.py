"""The region graph's two backends (issue 16, "Graph backends"): SQLite in OUT.zarr by
default, PostgreSQL through ``--graph postgresql://...``; the same segmentation either
way, the rows really in PostgreSQL, the URL recorded without a password and used on
resume, ``--force`` dropping the run's schema, and the refusals (the SQLite graph for
workers on other hosts, a password in the URL, a bad URL, an unreachable server).

The PostgreSQL tests start a throwaway server (``pg_server.py``: its own data directory,
127.0.0.1, a free port, a non-root user) and are skipped, saying why, where none can be.
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from psc.app.segment import main as segment_main
from psc.pipelines.em import graph_url, layout
from psc.pipelines.em.graph import GraphStore
from psc.utils.errors import InputError

from em_fixtures import synthetic_raw, tiny_weights
from pg_server import PASSWORD, PostgresServer

SHAPE = (24, 32, 28)
BLOCK = ("12", "16", "16")
THRESHOLDS = ("0.01", "0.5", "0.99")  # the untrained model: 0.5 merges all


@pytest.fixture(scope="module")
def postgres():
    reason = PostgresServer.unavailable()
    if reason:
        pytest.skip(reason)
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def pg_env(postgres, monkeypatch):
    """The password the way a cluster gives it: in the environment, not in the URL."""
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    return postgres


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("graphs")
    raw, _, _ = synthetic_raw(folder, shape=SHAPE, chunks=(12, 16, 16))
    return folder, raw, tiny_weights(folder)


def _segment(raw, out, weights, *extra) -> list[str]:
    return [str(raw / "raw"), "-o", str(out), "--weights", str(weights), "--workers", "0", "--device", "cpu",
            "--block-size", *BLOCK, "--thresholds", *THRESHOLDS, "--threshold", "0.01", *extra]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("psc-segment: error:"), err
    return err[0]


@pytest.fixture(scope="module")
def sqlite_run(case):
    folder, raw, weights = case
    out = folder / "sqlite.zarr"
    assert segment_main(_segment(raw, out, weights)) == 0
    return out


# --- URLs: parsing, secrets, the run's schema -------------------------------------------------

def test_urls_are_parsed_and_passwords_refused(tmp_path):
    assert graph_url.parse(None).kind == "sqlite" and graph_url.parse("").sqlite_file(tmp_path / "o.zarr") == \
        tmp_path / "o.zarr" / layout.GRAPH_FILE
    assert graph_url.parse(f"sqlite://{tmp_path}/g.sqlite").path == tmp_path / "g.sqlite"
    url = graph_url.parse("postgresql://me@db.cluster:5433/em?sslmode=require&schema=run_1")
    assert (url.kind, url.schema) == ("postgresql", "run_1")
    assert "schema" not in url.conninfo and "sslmode=require" in url.conninfo
    for bad in ("mysql://me@h/db", "postgresql://me@h:port/db", "postgresql://me@h:5432/", "sqlite:",
                "postgresql://me@h/db?schema=Bad-Name"):
        with pytest.raises(InputError):
            graph_url.parse(bad)
    for secret in ("postgresql://me:hunter2@h/db", "postgresql://me@h/db?password=hunter2"):
        with pytest.raises(InputError, match="PGPASSWORD") as error:
            graph_url.parse(secret)
        assert "hunter2" not in str(error.value)


def test_a_run_gets_its_own_schema_and_a_resume_keeps_it(tmp_path):
    given = "postgresql://me@h:5432/db"
    first = graph_url.for_run(given, tmp_path / "Fib 25.zarr", None)
    schema = graph_url.parse(first).schema
    assert schema.startswith("psc_fib_25_") and first.startswith(given)
    assert graph_url.for_run(given, tmp_path / "Fib 25.zarr", first) == first  # the same database: resumed
    assert graph_url.for_run(None, tmp_path / "x.zarr", first) == first  # not given: the recorded one
    assert graph_url.for_run(None, tmp_path / "x.zarr", None) == ""  # a new run: SQLite in OUT.zarr
    other = graph_url.for_run("postgresql://me@h:5432/other", tmp_path / "Fib 25.zarr", first)
    assert graph_url.parse(other).schema != schema


# --- workers on other hosts --------------------------------------------------------------------

@pytest.mark.parametrize("extra, refused", [
    (["--worker-command", "ssh node psc-worker {out}", "--host", "node0.cluster"], True),
    (["--worker-command", "ssh node psc-worker {out}"], True),  # the detected host: reachable from elsewhere
    (["--spool", "--workers", "1", "--host", "10.0.0.5"], True),
    (["--worker-command", "psc-worker {out}", "--host", "127.0.0.1"], False),  # every worker on this host
    (["--workers", "2", "--host", "10.0.0.5"], False),  # local worker processes
])
def test_sqlite_is_refused_for_workers_on_other_hosts(extra, refused):
    call = lambda: graph_url.check_shared("", "--worker-command" in extra and extra[1] or None,  # noqa: E731
                                          "--spool" in extra, extra[extra.index("--host") + 1]
                                          if "--host" in extra else None)
    if refused:
        with pytest.raises(InputError, match="--graph postgresql://"):
            call()
    else:
        call()
    graph_url.check_shared("postgresql://me@h/db?schema=s", "ssh x", False, "node0")  # PostgreSQL: fine


def test_the_command_line_refuses_sqlite_for_remote_workers_before_any_work(case, capsys):
    folder, raw, weights = case
    out = folder / "remote.zarr"
    code = segment_main(_segment(raw, out, weights, "--worker-command", "ssh node psc-worker {out}",
                                 "--host", "node0.cluster"))
    assert code != 0
    line = _one_error_line(capsys)
    assert "SQLite" in line and "--graph postgresql://" in line
    assert not out.exists()


def test_a_password_in_the_url_is_refused_before_any_work(case, capsys):
    folder, raw, weights = case
    out = folder / "secret.zarr"
    assert segment_main(_segment(raw, out, weights, "--graph", "postgresql://psc:hunter2@127.0.0.1/psc")) != 0
    line = _one_error_line(capsys)
    assert "PGPASSWORD" in line and "hunter2" not in line and not out.exists()


def test_an_unreachable_server_is_one_line_before_any_work(case, capsys):
    pytest.importorskip("psycopg")
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folder, raw, weights = case
    out = folder / "unreachable.zarr"
    assert segment_main(_segment(raw, out, weights, "--graph", f"postgresql://psc@127.0.0.1:{port}/psc")) != 0
    assert "cannot reach the PostgreSQL graph" in _one_error_line(capsys) and not out.exists()


def test_missing_psycopg_names_the_extra(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_psycopg(name, *args, **kwargs):
        if name == "psycopg" or name.startswith("psycopg."):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_psycopg)
    with pytest.raises(InputError, match=r'pip install "psc\[cluster\]"'):
        graph_url.check_reachable("postgresql://me@127.0.0.1/db?schema=s")


# --- the store itself: the same answers from both backends ---------------------------------

def _fill(graph) -> None:
    graph.write_fragments(1, np.array([10, 11, 12], np.uint64), np.array([5, 6, 7]))
    graph.write_fragments(2, np.array([20, 21], np.uint64), np.array([1, 2]))
    graph.write_edges(1, [(10, 11, 0.9, 0.1), (11, 12, 0.5, None)])
    graph.write_edges(2, (np.array([20], np.uint64), np.array([21], np.uint64), np.array([0.7]),
                          np.array([0.3])))
    graph.write_edges(1, [(10, 11, 0.9, 0.15), (10, 12, 0.4, 0.6), (11, 12, 0.5, None)])  # block 1 re-run
    graph.write_lookup(0.5, np.array([10, 11, 12, 20, 21], np.uint64), np.array([1, 1, 2, 3, 3], np.uint64))
    graph.write_lookup(0.2, np.array([10, 11], np.uint64), np.array([1, 2], np.uint64))
    graph.write_lookup(0.2, np.array([10, 11, 12], np.uint64), np.array([1, 2, 3], np.uint64))  # replaced


def _read(graph) -> dict:
    u, v, score = graph.edges()
    order = np.lexsort((v, u))
    return {"ids": graph.fragment_ids().tolist(), "edges": list(zip(u[order].tolist(), v[order].tolist(),
                                                                       score[order].tolist())),
            "thresholds": graph.thresholds(), "lookup": [a.tolist() for a in graph.lookup(0.2)],
            "dtypes": (graph.fragment_ids().dtype, u.dtype, graph.lookup(0.5)[1].dtype)}


def test_both_backends_store_and_replace_alike(tmp_path, pg_env):
    sqlite = GraphStore(tmp_path / "g.sqlite")
    postgres = graph_url.open_graph(f"{pg_env.url}?schema=store_test", tmp_path)
    try:
        for graph in (sqlite, postgres):
            _fill(graph)
        expected = {"ids": [10, 11, 12, 20, 21],
                    "edges": [(10, 11, 0.15), (10, 12, 0.6), (11, 12, np.inf), (20, 21, 0.3)],
                    "thresholds": [0.2, 0.5], "lookup": [[10, 11, 12], [1, 2, 3]],
                    "dtypes": (np.dtype(np.uint64),) * 3}
        assert _read(sqlite) == expected
        assert _read(postgres) == expected
        with pytest.raises(KeyError):
            postgres.lookup(0.9)
    finally:
        sqlite.close()
        postgres.clear()
        postgres.close()


# --- whole runs -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def postgres_run(case, postgres):
    folder, raw, weights = case
    out = folder / "postgres.zarr"
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    try:
        assert segment_main(_segment(raw, out, weights, "--graph", postgres.url)) == 0
    finally:
        monkeypatch.undo()
    return out


def test_postgresql_and_sqlite_runs_give_the_same_segmentation(sqlite_run, postgres_run, postgres):
    from psc.pipelines.em.volumes import open_volume

    for name in (layout.FRAGMENTS, layout.SEGMENTATION):
        np.testing.assert_array_equal(open_volume(sqlite_run, name).array[:], open_volume(postgres_run, name).array[:])
    assert len(np.unique(open_volume(postgres_run, layout.SEGMENTATION).array[:])) > 1
    assert not (postgres_run / layout.GRAPH_FILE).exists()  # the graph is not in the zarr
    # the rows really are in PostgreSQL, in the run's schema, as many as in the SQLite graph
    from psc.pipelines.em.graph_postgres import table_counts

    schema = graph_url.parse(layout.RunSettings.load(postgres_run).graph).schema
    with postgres.connect() as connection:
        counts = table_counts(connection, schema)
        fragments = sorted(r[0] for r in connection.execute(f"SELECT id FROM {schema}.fragments").fetchall())
    sqlite = GraphStore(sqlite_run / layout.GRAPH_FILE)
    try:
        expected = {table: sqlite.connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
                    for table in ("fragments", "edges", "lookup_parts")}
        assert fragments == sqlite.fragment_ids().tolist()
    finally:
        sqlite.close()
    assert counts == expected and counts["edges"] > 0 and counts["lookup_parts"] > 0


def test_the_recorded_url_has_no_password_and_names_the_schema(postgres_run, postgres):
    recorded = layout.RunSettings.load(postgres_run).graph
    assert recorded.startswith(postgres.url + "?schema=psc_postgres_")
    attrs = "".join(p.read_text(errors="replace") for p in postgres_run.rglob("zarr.json"))
    assert PASSWORD not in attrs and recorded in attrs


def test_a_resume_uses_the_recorded_url(case, postgres_run, pg_env, capsys):
    folder, raw, weights = case
    before = layout.RunSettings.load(postgres_run).graph
    assert segment_main(_segment(raw, postgres_run, weights, "--threshold", "0.99")) == 0  # no --graph
    assert layout.RunSettings.load(postgres_run).graph == before
    assert not (postgres_run / layout.GRAPH_FILE).exists()  # not a new SQLite graph
    assert segment_main(_segment(raw, postgres_run, weights, "--graph", pg_env.url)) == 0  # the same database
    assert layout.RunSettings.load(postgres_run).graph == before
    capsys.readouterr()
    assert segment_main(_segment(raw, postgres_run, weights, "--graph", f"sqlite://{folder}/g.sqlite")) != 0
    line = _one_error_line(capsys)
    assert "graph" in line and "--force" in line


def test_psc_eval_and_evaluate_read_a_postgresql_run(postgres_run, sqlite_run, case, pg_env):
    from psc.pipelines.em.evaluate import evaluate_run

    folder, raw, _ = case
    gt = str(raw / "labels")
    assert evaluate_run(str(postgres_run), gt, progress=False) == evaluate_run(str(sqlite_run), gt, progress=False)


def test_force_drops_the_runs_schema_only(case, pg_env):
    folder, raw, weights = case
    out = folder / "forced.zarr"
    other = graph_url.open_graph(f"{pg_env.url}?schema=someone_else", out)
    other.write_fragments(1, np.array([5], np.uint64), np.array([1]))
    other.close()
    assert segment_main(_segment(raw, out, weights, "--graph", pg_env.url, "--stage", "predict", "fragments")) == 0
    schema = graph_url.parse(layout.RunSettings.load(out).graph).schema
    assert segment_main(_segment(raw, out, weights, "--graph", pg_env.url, "--force", "--stage", "predict")) == 0
    with pg_env.connect() as connection:
        schemas = {r[0] for r in connection.execute("SELECT schema_name FROM information_schema.schemata")}
        assert schema not in schemas  # dropped; predict alone does not open the graph
        assert connection.execute("SELECT COUNT(*) FROM someone_else.fragments").fetchone()[0] == 1
        connection.execute("DROP SCHEMA someone_else CASCADE")
