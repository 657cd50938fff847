"""Which region graph a run uses: its graph URL (``psc-segment --graph URL``), parsed,
checked before any work, recorded without secrets in the run's settings, and opened by
every process that reads or writes the graph (the stage workers, merge, relabel,
psc-eval, the napari Threshold widget) through :func:`open_run_graph`.

URL forms:

- ``""`` (the default; also what runs recorded before ``--graph`` existed mean): the
  SQLite file ``OUT.zarr/graph.sqlite``. Recorded as ``""``, so the run keeps working
  wherever OUT.zarr is mounted;
- ``sqlite:///abs/path.sqlite`` or ``sqlite:relative/path.sqlite``: a SQLite file
  elsewhere (recorded with its absolute path);
- ``postgresql://user@host:port/db`` (or ``postgres://``; libpq's query options such as
  ``sslmode=`` pass through): PostgreSQL. The run's tables live in a schema of their own,
  ``?schema=NAME``; without one a new run gets ``psc_<output name>_<8 hex digits>``,
  recorded in the URL, so one database holds many runs and ``--force`` drops one run's
  schema only. A password in the URL is refused: it would be written into the zarr
  attributes. libpq reads it from ``PGPASSWORD`` or ``~/.pgpass`` instead.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from psc.utils.errors import InputError

from . import layout
from .graph import GraphStore, RegionGraph

CLUSTER_EXTRA = 'pip install "psc[cluster]"'
SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


@dataclass(frozen=True)
class GraphURL:
    """A parsed graph URL: ``kind`` ``sqlite`` (``path``; None: the file in OUT.zarr) or
    ``postgresql`` (``conninfo``: what libpq is given, ``schema``: the run's tables)."""

    text: str
    kind: str
    path: Path | None = None
    conninfo: str = ""
    schema: str | None = None

    def sqlite_file(self, out: str | Path) -> Path:
        return self.path if self.path is not None else layout.graph_path(out)

    def describe(self) -> str:
        return self.text or f"SQLite ({layout.GRAPH_FILE} in the output)"


def parse(text: str | None) -> GraphURL:
    """Parse a graph URL (the module docstring's forms); a bad one is one ``InputError``."""
    text = (text or "").strip()
    if not text:
        return GraphURL("", "sqlite")
    scheme = text.split(":", 1)[0].lower() if ":" in text else ""
    if scheme == "sqlite":
        rest = text.split(":", 1)[1]
        rest = rest[2:] if rest.startswith("//") else rest
        if not rest:
            raise InputError(f"--graph {text}: a SQLite URL names a file: sqlite:///path/graph.sqlite")
        path = Path(rest).expanduser().resolve()
        return GraphURL(f"sqlite://{path}", "sqlite", path=path)
    if scheme in ("postgresql", "postgres"):
        return _parse_postgres(text)
    raise InputError(f"--graph {text}: not a graph URL (give sqlite:///path or postgresql://user@host:port/db)")


def _parse_postgres(text: str) -> GraphURL:
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError as error:
        raise InputError(f"--graph {text}: not a PostgreSQL URL ({error})") from None
    if parts.password is not None:
        raise InputError("--graph: the URL holds a password, which the run would record in OUT.zarr; give it "
                         "in PGPASSWORD or ~/.pgpass instead (postgresql://user@host:port/db)")
    database = parts.path.lstrip("/")
    if not database or "/" in database:
        raise InputError(f"--graph {text}: name the database: postgresql://user@host:port/db")
    options = parse_qsl(parts.query, keep_blank_values=True)
    schema = None
    for key, value in options:
        if key.lower() == "password":
            raise InputError("--graph: the URL holds a password, which the run would record in OUT.zarr; give it "
                             "in PGPASSWORD or ~/.pgpass instead")
        if key == "schema":
            schema = value
    if schema is not None and not SCHEMA_NAME.match(schema):
        raise InputError(f"--graph {text}: schema {schema!r} must be lower-case letters, digits and _ "
                         "(at most 63, not starting with a digit)")
    passed = [(k, v) for k, v in options if k != "schema"]
    conninfo = urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(passed), ""))
    return GraphURL(text, "postgresql", conninfo=conninfo, schema=schema)


def with_schema(url: GraphURL, schema: str) -> GraphURL:
    parts = urlsplit(url.text)
    options = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "schema"]
    text = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode([*options, ("schema", schema)]), ""))
    return _parse_postgres(text)


def new_schema(out: str | Path) -> str:
    stem = re.sub(r"[^a-z0-9_]+", "_", Path(out).name.removesuffix(".zarr").lower()).strip("_")[:40]
    return f"psc_{stem + '_' if stem else ''}{secrets.token_hex(4)}"


def for_run(given: str | None, out: str | Path, recorded: str | None) -> str:
    """The graph URL a run records. ``given``: ``--graph`` (None: not given);
    ``recorded``: the URL of the run already in ``out`` (None: a new run).

    Not given: the recorded URL (a resume), else the default. Given without a schema
    for a PostgreSQL database: the recorded run's schema when it is the same database,
    else a new one. Any other difference from the recorded URL is the run settings'
    business (``layout.SETTING_RULES['graph']``: refused on resume)."""
    if given is None:
        return recorded if recorded is not None else ""
    url = parse(given)
    if url.kind != "postgresql" or url.schema is not None:
        return url.text
    if recorded:
        before = parse(recorded)
        if before.kind == "postgresql" and before.conninfo == url.conninfo and before.schema:
            return before.text
    return with_schema(url, new_schema(out)).text


def is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def workers_elsewhere(worker_command: str | None, spool: bool, host: str | None) -> bool:
    """Whether a run's workers may be on other hosts: psc starts them through a command
    or posts them for servers (``--worker-command``, ``--spool``) *and* the scheduler is
    reachable beyond this machine (``--host`` not a loopback address; the default host is
    the machine's outward address). Plain ``--workers N`` are processes of this host."""
    return bool(worker_command or spool) and not is_loopback(host)


def check_shared(url: str, worker_command: str | None, spool: bool, host: str | None) -> None:
    """Refuse the SQLite graph for workers on other hosts: its WAL mode needs the shared
    memory of one host, and over a network file system it corrupts."""
    if parse(url).kind == "sqlite" and workers_elsewhere(worker_command, spool, host):
        option = "--worker-command" if worker_command else "--spool"
        raise InputError(f"{option} with --host {host or '(detected)'} lets workers on other hosts write the region "
                         "graph, and the SQLite graph is one host's: give --graph postgresql://user@host:port/db "
                         "(pip install \"psc[cluster]\"), or --host 127.0.0.1 if every worker runs here")


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise InputError(f"--graph postgresql://... needs psycopg 3: {CLUSTER_EXTRA}") from None
    return psycopg


def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).split("\n")[0].split())
    return text or type(error).__name__


def open_graph(url: str | None, out: str | Path, connect_timeout: int = 10) -> RegionGraph:
    """Open (creating its tables if need be) the graph of ``url`` for the run in ``out``.
    An unreachable server or missing psycopg is one ``InputError``."""
    parsed = parse(url)
    if parsed.kind == "sqlite":
        return GraphStore(parsed.sqlite_file(out))
    if parsed.schema is None:
        raise InputError(f"graph {parsed.text}: no schema (a run's URL names one; see graph_url.for_run)")
    psycopg = _psycopg()
    from .graph_postgres import PostgresGraph

    try:
        return PostgresGraph(parsed.conninfo, parsed.schema, connect_timeout=connect_timeout)
    except psycopg.OperationalError as error:
        raise InputError(f"cannot reach the PostgreSQL graph {parsed.text}: {_first_line(error)}") from None


def check_reachable(url: str, connect_timeout: int = 10) -> None:
    """Before any work: psycopg installed, the server reachable, the password accepted.
    Creates nothing (``open_graph`` does that, in the run)."""
    parsed = parse(url)
    if parsed.kind != "postgresql":
        return
    psycopg = _psycopg()
    try:
        with psycopg.connect(parsed.conninfo, connect_timeout=connect_timeout, autocommit=True) as connection:
            connection.execute("SELECT 1")
    except psycopg.OperationalError as error:
        raise InputError(f"cannot reach the PostgreSQL graph {parsed.text}: {_first_line(error)}") from None


def has_graph(url: str | None, out: str | Path) -> bool:
    """Whether a graph may hold rows without creating one: a SQLite file exists; a
    PostgreSQL run is asked when opened (opening creates only its empty schema)."""
    parsed = parse(url)
    return parsed.sqlite_file(out).is_file() if parsed.kind == "sqlite" else True


def recorded_url(out: str | Path) -> str:
    """The graph URL recorded in the run's settings ("" for runs from before ``--graph``)."""
    return layout.RunSettings.load(out).graph


def open_run_graph(out: str | Path, settings: layout.RunSettings | None = None) -> RegionGraph:
    """The graph of the run in ``out``, through its recorded URL."""
    if settings is None:
        try:
            settings = layout.RunSettings.load(out)
        except (KeyError, FileNotFoundError):
            raise InputError(f"{out}: not a psc EM run (no run settings)") from None
    return open_graph(settings.graph, out)


def clear_graph(url: str | None, out: str | Path) -> None:
    """``--force``: drop the run's graph where it is not a file inside OUT.zarr (which
    ``run.clear_run`` removes with the run's files): the PostgreSQL schema of the run,
    or the tables of a SQLite file elsewhere (the file itself may be someone's)."""
    parsed = parse(url)
    if parsed.kind == "sqlite" and (parsed.path is None or not parsed.path.is_file()):
        return
    graph = open_graph(url, out)
    try:
        graph.clear()
    finally:
        graph.close()
