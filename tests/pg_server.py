"""A throwaway PostgreSQL server for the graph-backend tests: its own data directory
under /tmp, listening on 127.0.0.1 only at a free port, run by a non-root user (the
``postgres`` system user through ``runuser`` when the tests run as root, as in CI:
PostgreSQL refuses to run as root), with password authentication over TCP so that
the tests connect the way a cluster would (``PGPASSWORD``, no password in the URL).
Durability is switched off (``fsync=off``): the server lives for one test module.

``PostgresServer.unavailable()`` says why none can be started here (no binaries, no
non-root user to run them), for ``pytest.skip``.

``PostgresServer(listen=ADDRESS, netns=NAME)`` (the multi-host test): the server listens
on ADDRESS instead of 127.0.0.1, inside network namespace NAME (``ip netns exec``);
``options`` are more ``-c name=value`` settings (e.g. ``log_connections=on``).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

USER, PASSWORD, DATABASE = "psc", "psc-test-secret", "psc"


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4])
                   if Path(p).parts[4].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresServer:
    def __init__(self, listen: str = "127.0.0.1", netns: str | None = None, options: str = "") -> None:
        self.host, self.netns, self.options = listen, netns, options
        self.bin = _bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix="psc-pg-"))  # under /tmp: the postgres user can enter it
        self.data = self.root / "data"
        self.port = _free_port()
        self.as_user = os.geteuid() == 0  # root: run as the postgres system user

    @staticmethod
    def unavailable() -> str | None:
        if _bin_dir() is None:
            return "no PostgreSQL binaries (initdb, pg_ctl) in /usr/lib/postgresql/*/bin or on PATH"
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                return "running as root and no runuser to start PostgreSQL as a non-root user"
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                return "running as root and no 'postgres' system user to start PostgreSQL as"
        try:
            import psycopg  # noqa: F401
        except ImportError:
            return 'psycopg is not installed (pip install "psc[cluster]")'
        return None

    def _run(self, *command: str) -> None:
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        prefix += ["runuser", "-u", "postgres", "--"] if self.as_user else []
        subprocess.run([*prefix, *command], check=True, capture_output=True, text=True, timeout=120)

    def start(self) -> "PostgresServer":
        password_file = self.root / "password"
        password_file.write_text(PASSWORD + "\n")
        if self.as_user:
            entry = pwd.getpwnam("postgres")
            for path in (self.root, password_file):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", USER, f"--pwfile={password_file}",
                  "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync")
        if self.host != "127.0.0.1":  # initdb admits loopback only: the listening address's subnet too
            with open(self.data / "pg_hba.conf", "a") as hba:
                hba.write("host all all samenet scram-sha-256\n")
        options = (f"-c listen_addresses={self.host} -p {self.port} -k {self.root} -c fsync=off "
                   f"-c synchronous_commit=off -c full_page_writes=off -c shared_buffers=32MB {self.options}")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l",
                  str(self.root / "server.log"), "-w", "-t", "60", "start")
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(self.admin_url, password=PASSWORD, autocommit=True) as connection:
                    connection.execute(f"CREATE DATABASE {DATABASE}")
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        return self

    @property
    def admin_url(self) -> str:
        return f"postgresql://{USER}@{self.host}:{self.port}/postgres"

    @property
    def url(self) -> str:
        """The URL a run is given (no password: that comes from PGPASSWORD)."""
        return f"postgresql://{USER}@{self.host}:{self.port}/{DATABASE}"

    def connect(self, **options):
        import psycopg

        return psycopg.connect(self.url, password=PASSWORD, autocommit=True, **options)

    def stop(self) -> None:
        try:
            if self.data.exists():
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        except subprocess.CalledProcessError:
            pass  # not started
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
