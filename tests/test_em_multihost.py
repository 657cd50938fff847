"""Several hosts, for real (issue 16): three network namespaces as three machines on one
/24, joined by a bridge in the root namespace. Host A runs the scheduler
(``psc-segment --worker-command ... --host A``) and PostgreSQL (listening on A's address
only); hosts B and C run the workers, which reach the scheduler (daisy's
``DAISY_CONTEXT``) and PostgreSQL by TCP over their veth. The zarr arrays are on the
shared file system (one tmp folder, which every namespace sees). The worker command is a
small wrapper that places each worker on B or C in turn, as a cluster's batch system
would, and leaves out a host marked down.

Mid-run, once the fragments stage is done (both hosts wrote to PostgreSQL) and the
edges stage has started, every process of host B is killed (SIGKILL) and B is
marked down: the run must still finish, its segmentation equal to a one-host (serial)
run's, with the rows in PostgreSQL and PostgreSQL's log showing connections from B's and
C's addresses.

Skipped, saying why, where namespaces cannot be made (not root, no ``ip``, ``ip netns
add`` refused) or no PostgreSQL server can be started. The namespaces, veths and bridge
are removed by the fixture's finaliser, also when the test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from psc.app.segment import main as segment_main
from psc.pipelines.em import graph_url, layout
from psc.pipelines.em.volumes import open_volume

from em_fixtures import synthetic_raw, tiny_weights
from pg_server import PASSWORD, PostgresServer

pytestmark = pytest.mark.slow

SHAPE = (24, 32, 32)
BLOCK = ("12", "16", "16")  # 8 blocks a stage: four or so per worker
THRESHOLDS = ("0.01", "0.5", "0.99")
WORKER = Path(sys.executable).with_name("psc-worker")

# the worker command's wrapper: the next live host, round robin, then `ip netns exec HOST
# psc-worker OUT` in its place (so the process that dies with the host is the worker)
PLACE = r'''
import fcntl, json, os, sys
from pathlib import Path
here = Path(__file__).parent
config = json.loads((here / "hosts.json").read_text())
with open(here / "place.lock", "a+") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    down = set((here / "down").read_text().split()) if (here / "down").exists() else set()
    alive = [host for host in config["hosts"] if host not in down]
    placed = here / "placed"
    n = len(placed.read_text().splitlines()) if placed.exists() else 0
    host = alive[n % len(alive)]
    with open(placed, "a") as log:
        log.write(host + "\n")
os.execvp("ip", ["ip", "netns", "exec", host, config["worker"], *sys.argv[1:]])
'''


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def _why_no_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2) to make network namespaces"
    return None


def _subnet(tag: int) -> str:
    """A 10.213.N.0/24 no interface of this machine already has (the bridge gets .254)."""
    used = _ip("-4", "-o", "addr").stdout
    for step in range(250):
        prefix = f"10.213.{(tag + step) % 250 + 1}"
        if f" {prefix}." not in used:
            return prefix
    pytest.skip("no free 10.213.N.0/24 subnet for the test's namespaces")


def _pids(namespace: str) -> list[int]:
    found = _ip("netns", "pids", namespace, check=False).stdout.split()
    return [int(pid) for pid in found if pid.isdigit()]


def _kill_namespace(namespace: str) -> list[int]:
    pids = _pids(namespace)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


@pytest.fixture(scope="module")
def hosts():
    """Three namespaces A (scheduler, PostgreSQL), B and C (workers), each with loopback
    up and a veth into the bridge; removed, with anything left running in them, at the
    end whatever happens."""
    reason = _why_no_namespaces()
    if reason:
        pytest.skip(reason)
    tag = os.getpid() % 100000
    names = {role: f"psc{tag}{role}" for role in "abc"}  # ip netns names; interface names <= 15 chars
    bridge = f"pscbr{tag}"
    prefix = _subnet(tag)
    made_namespaces, made_links = [], []
    try:
        probe = _ip("netns", "add", names["a"], check=False)
        if probe.returncode:
            pytest.skip(f"ip netns add failed: {probe.stderr.strip()}")
        made_namespaces.append(names["a"])
        for role in "bc":
            _ip("netns", "add", names[role])
            made_namespaces.append(names[role])
        _ip("link", "add", bridge, "type", "bridge")
        made_links.append(bridge)
        _ip("addr", "add", f"{prefix}.254/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        address = {}
        for number, role in enumerate("abc", start=1):
            outside, inside = f"pscv{tag}{role}", f"pscv{tag}{role}i"
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            made_links.append(outside)
            _ip("link", "set", inside, "netns", names[role])
            _ip("link", "set", outside, "master", bridge)
            _ip("link", "set", outside, "up")
            _ip("-n", names[role], "link", "set", "lo", "up")
            _ip("-n", names[role], "addr", "add", f"{prefix}.{number}/24", "dev", inside)
            _ip("-n", names[role], "link", "set", inside, "up")
            address[role] = f"{prefix}.{number}"
        _check_reachable(names, address)
        yield {"ns": names, "address": address}
    finally:
        for namespace in made_namespaces:
            _kill_namespace(namespace)
        for link in made_links:
            _ip("link", "del", link, check=False)
        for namespace in made_namespaces:
            _ip("netns", "del", namespace, check=False)


def _check_reachable(names: dict, address: dict) -> None:
    """B and C reach a TCP port on A through the bridge (a bridge firewall could drop it)."""
    server = subprocess.Popen(["ip", "netns", "exec", names["a"], sys.executable, "-c",
                               "import socket, sys\n"
                               f"s = socket.create_server(('{address['a']}', 0)); print(s.getsockname()[1], flush=True)\n"
                               "for _ in range(2):\n    c, _ = s.accept(); c.sendall(b'ok'); c.close()\n"],
                              stdout=subprocess.PIPE, text=True)
    try:
        port = server.stdout.readline().strip()
        for role in "bc":
            got = subprocess.run(["ip", "netns", "exec", names[role], sys.executable, "-c",
                                  "import socket\n"
                                  f"print(socket.create_connection(('{address['a']}', {port}), 5).recv(2).decode())"],
                                 capture_output=True, text=True, timeout=30)
            if got.stdout.strip() != "ok":
                pytest.skip(f"namespaces made, but host {role} cannot reach host a over the bridge "
                            f"(a bridge firewall?): {got.stderr.strip()[-300:]}")
    finally:
        server.kill()
        server.wait()


@pytest.fixture(scope="module")
def postgres(hosts):
    reason = PostgresServer.unavailable()
    if reason:
        pytest.skip(reason)
    server = PostgresServer(listen=hosts["address"]["a"], netns=hosts["ns"]["a"], options="-c log_connections=on")
    try:
        yield server.start()
    finally:
        server.stop()  # before the namespaces go (the hosts fixture outlives this one)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multihost")
    raw, _, _ = synthetic_raw(folder, shape=SHAPE, chunks=(12, 16, 16))
    return folder, raw, tiny_weights(folder)


def _arguments(raw: Path, out: Path, weights: Path, *extra: str) -> list[str]:
    return [str(raw / "raw"), "-o", str(out), "--weights", str(weights), "--device", "cpu",
            "--block-size", *BLOCK, "--thresholds", *THRESHOLDS, "--threshold", "0.01", *extra]


def _done_blocks(out: Path, stage: str) -> int:
    """Blocks of ``stage`` daisy has marked done (its markers: a uint8 zarr array, 1 = done)."""
    markers = layout.tracking_path(out, stage) / "done"
    try:
        return int(np.count_nonzero(zarr.open_array(str(markers), mode="r")[...] == 1))
    except Exception:  # not made yet, or being written
        return 0


def test_workers_on_two_hosts_survive_one_dying(case, hosts, postgres):
    folder, raw, weights = case
    ns, address = hosts["ns"], hosts["address"]

    # one host, one process: the reference
    single = folder / "one_host.zarr"
    assert segment_main(_arguments(raw, single, weights, "--workers", "0")) == 0

    place = folder / "place"
    place.mkdir()
    (place / "place.py").write_text(PLACE)
    (place / "hosts.json").write_text(json.dumps({"hosts": [ns["b"], ns["c"]], "worker": str(WORKER)}))
    out = folder / "three_hosts.zarr"
    command = ["ip", "netns", "exec", ns["a"], str(Path(sys.executable).with_name("psc-segment")),
               *_arguments(raw, out, weights, "--workers", "2", "--host", address["a"], "--graph", postgres.url,
                           "--worker-command", f"{sys.executable} {place / 'place.py'} {{out}}")]
    env = dict(os.environ, PGPASSWORD=PASSWORD, OMP_NUM_THREADS="1")
    log = folder / "scheduler.out"
    started = time.monotonic()
    with open(log, "w") as sink:
        scheduler = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        killed, done_at_kill, placed_at_kill = [], 0, 0
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and scheduler.poll() is None:
            # mid-edges: both hosts have written fragments to PostgreSQL, edges are half done
            done = _done_blocks(out, "edges")
            if done >= 1 and _pids(ns["b"]):
                (place / "down").write_text(ns["b"] + "\n")  # the batch system places nothing more there
                killed, done_at_kill = _kill_namespace(ns["b"]), done
                placed_at_kill = len((place / "placed").read_text().split())
                break
            time.sleep(0.05)
        assert killed, f"host b had no process to kill before the run ended: {log.read_text()[-2000:]}"
        code = scheduler.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if scheduler.poll() is None:
            scheduler.kill()
            scheduler.wait()
    seconds = time.monotonic() - started
    assert code == 0, log.read_text()[-3000:]
    assert not _pids(ns["b"]) and not _pids(ns["c"]), "workers left running after the run"

    placed = (place / "placed").read_text().split()
    total = _done_blocks(out, "edges")
    print(f"three hosts: {seconds:.1f} s; killed {len(killed)} processes on host b with {done_at_kill} "
          f"of {total} edges blocks done; workers placed: {placed.count(ns['b'])} on b, {placed.count(ns['c'])} on c")
    assert done_at_kill < total, "the kill came after the last edges block"
    assert ns["b"] in placed and ns["c"] in placed
    # after the kill, every worker started (in place of the dead ones, and relabel's) went to host c
    assert placed[placed_at_kill:] and set(placed[placed_at_kill:]) == {ns["c"]}, placed

    # the same segmentation as on one host
    for name in (layout.FRAGMENTS, layout.SEGMENTATION):
        np.testing.assert_array_equal(open_volume(single, name).array[:], open_volume(out, name).array[:],
                                      err_msg=name)
    assert len(np.unique(open_volume(out, layout.SEGMENTATION).array[:])) > 1
    assert not (out / layout.GRAPH_FILE).exists()

    # the graph is in PostgreSQL, and both worker hosts connected to it by TCP
    from psc.pipelines.em.graph_postgres import table_counts

    schema = graph_url.parse(layout.RunSettings.load(out).graph).schema
    with postgres.connect() as connection:
        counts = table_counts(connection, schema)
    assert counts["edges"] > 0 and counts["lookup_parts"] > 0
    server_log = (postgres.root / "server.log").read_text(errors="replace")
    for role in "bc":
        received = [line for line in server_log.splitlines() if "connection received" in line]
        assert any(f"host={address[role]} " in line for line in received), (role, received)
