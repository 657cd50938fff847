"""Spooled workers (``psc-segment --spool`` + ``psc-worker --serve``), as in the compose
deployment: long-running worker processes started before the scheduler take the workers
it posts under OUT.zarr/.workers/, and exit when the run is finished."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from psc.pipelines.em import spool
from psc.pipelines.em.run import prepare, run
from psc.pipelines.em.volumes import open_volume

from em_fixtures import synthetic_raw, tiny_weights

BLOCK = (16, 24, 20)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("em_spool")
    raw, _, _ = synthetic_raw(folder)
    weights = tiny_weights(folder)
    serial = folder / "serial.zarr"
    prepare(str(raw / "raw"), serial, weights, block_size=BLOCK, workers=1)
    run(serial, workers=0, progress=False)
    return folder, raw, weights, serial


def _servers(out, count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-m", "psc.app.worker", "--serve", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(count)]


def _finish(servers: list[subprocess.Popen], timeout: float = 120) -> list[str]:
    outputs = []
    for server in servers:
        try:
            output, _ = server.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in servers:
                other.kill()
            raise
        assert server.returncode == 0, output
        outputs.append(output)
    return outputs


def test_two_serving_workers_give_the_serial_result(inputs):
    folder, raw, weights, serial = inputs
    out = folder / "spooled.zarr"
    servers = _servers(out, 2)  # started first, as compose does: they wait for the run
    try:
        time.sleep(1.0)
        assert all(s.poll() is None for s in servers)
        prepare(str(raw / "raw"), out, weights, block_size=BLOCK, workers=2)
        report = run(out, workers=2, spool=True, host="127.0.0.1", progress=False)
        outputs = _finish(servers)  # they exit by themselves once the run is finished
    finally:
        for server in servers:
            if server.poll() is None:
                server.kill()
    assert all(s.failed == 0 for s in report["stages"])
    for name in ("affinities", "fragments", "segmentation"):
        np.testing.assert_array_equal(open_volume(out, name).array[:], open_volume(serial, name).array[:])
    # each stage posted 2 workers, and both servers ran some of them
    ran = [[line for line in text.splitlines() if ": worker " in line and "exited with code 0" in line]
           for text in outputs]
    assert sum(len(lines) for lines in ran) >= 4, outputs  # a worker of each stage at least
    assert all(ran), outputs  # both servers took part
    state = json.loads((out / spool.SPOOL_DIR / "run.json").read_text())
    assert state["state"] == "finished" and state["ok"] is True
    assert not [p for name in ("pending", "claimed") for p in (out / spool.SPOOL_DIR / name).glob("*.json")]


def test_a_server_ignores_an_earlier_finished_run(inputs, tmp_path):
    """A server that finds an earlier spooled run finished waits for the next run (here
    the relabel stage of a run whose other stages are done) and serves that one."""
    _, raw, weights, serial = inputs
    out = tmp_path / "again.zarr"
    prepare(str(raw / "raw"), out, weights, block_size=BLOCK, workers=1)
    run(out, workers=0, progress=False, stages=("predict", "fragments", "edges", "merge"))
    spool.finish_run(out, spool.start_run(out), ok=True)  # an earlier, finished spooled run
    servers = _servers(out, 1)
    try:
        time.sleep(2.0)
        assert servers[0].poll() is None, servers[0].communicate()[0]  # still waiting
        run(out, workers=1, spool=True, host="127.0.0.1", progress=False, stages=("relabel",))
        outputs = _finish(servers)
    finally:
        if servers[0].poll() is None:
            servers[0].kill()
    assert "relabel: running worker" in outputs[0], outputs[0]
    expected = open_volume(serial, "segmentation").array[:]
    np.testing.assert_array_equal(open_volume(out, "segmentation").array[:], expected)


def test_a_lost_server_is_given_up(tmp_path, monkeypatch):
    """A claimed worker whose server stops touching the claim makes the spawn function
    raise (daisy then counts a dead worker and starts another) instead of hanging."""
    import daisy

    monkeypatch.setattr(spool, "LOST_AFTER_S", 1.0)
    monkeypatch.setattr(spool, "POLL_S", 0.05)
    out = tmp_path / "lost.zarr"
    spool.start_run(out)
    pending = out / spool.SPOOL_DIR / "pending"
    context = daisy.Context(hostname="127.0.0.1", port=1, task_id="predict", worker_id=0)

    import threading

    def claim_and_vanish():
        while not list(pending.glob("*.json")):
            time.sleep(0.01)
        request = next(pending.glob("*.json"))
        request.rename(out / spool.SPOOL_DIR / "claimed" / request.name)

    thief = threading.Thread(target=claim_and_vanish)
    thief.start()
    with pytest.raises(RuntimeError, match="stopped answering"):
        spool.SpoolWorker(str(out))(context=context)
    thief.join()


def test_worker_and_segment_refuse_bad_spool_arguments(inputs, tmp_path):
    _, raw, weights, _ = inputs
    result = subprocess.run([sys.executable, "-m", "psc.app.worker", "--serve", str(tmp_path / "no" / "o.zarr")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.startswith("psc-worker: error:")
    assert len(result.stderr.strip().splitlines()) == 1
    result = subprocess.run([sys.executable, "-m", "psc.app.segment", str(raw / "raw"), "-o",
                             str(tmp_path / "x.zarr"), "--weights", str(weights), "--spool", "--workers", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    expected = "psc-segment: error: --spool needs --workers >= 1 and no --worker-command"
    assert result.stderr.strip().splitlines() == [expected]
