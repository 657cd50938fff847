"""Workers that are already running (containers, long-lived jobs) instead of started ones.

daisy starts a worker by calling a *spawn function* that must block until the worker
exits. With ``psc-segment ... --spool`` that function posts the worker's daisy context as
a file under ``OUT.zarr/.workers/pending/`` and waits; every ``psc-worker --serve
OUT.zarr`` process (one per GPU container, say) claims pending requests by an atomic
rename, runs each as a ``psc-worker`` child process and answers with its exit code under
``done/``. So the scheduler and its workers share nothing but the output container on a
shared volume, which they need anyway, plus the scheduler's TCP port.

A server runs at most one worker of each stage at a time: ``predict`` (the GPU) beside
the CPU stages. Every stage therefore always gets a worker from a free server, so a stage
waiting for an upstream stage can never hold the only server that stage needs.

Files under ``OUT.zarr/.workers/``:

- ``run.json``: ``{"id", "state": "running" | "finished", "ok"}``, written by the
  scheduler at the start and the end of ``run()``; servers exit when the run they saw
  running (or any later one) is finished, ignoring a finished run they found on start.
- ``pending/<name>.json``: one worker request (the daisy context); ``claimed/<name>.json``
  once a server took it (the server touches it every few seconds: a claim that stops
  being touched means its server is gone, and the scheduler gives that worker up, so daisy
  starts another); ``done/<name>.json``: the worker's exit code.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

SPOOL_DIR = ".workers"
POLL_S = 0.5
HEARTBEAT_S = 5.0
LOST_AFTER_S = 60.0  # a claim untouched this long (by the scheduler's clock) is a lost server

log = logging.getLogger(__name__)


def spool_dir(out: str | Path) -> Path:
    return Path(out) / SPOOL_DIR


def _write_json(path: Path, data: dict) -> None:
    """Write beside, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def start_run(out: str | Path) -> str:
    """Scheduler side: forget requests of an earlier (killed) run, announce this one."""
    root = spool_dir(out)
    for name in ("pending", "claimed", "done"):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.json"):
            stale.unlink(missing_ok=True)
    run_id = uuid.uuid4().hex
    _write_json(root / "run.json", {"id": run_id, "state": "running"})
    return run_id


def finish_run(out: str | Path, run_id: str, ok: bool) -> None:
    """Scheduler side: the run is over; requests nobody took are moot. (A worker that
    daisy no longer waited for may still report under done/: start_run clears it.)"""
    root = spool_dir(out)
    for request in (root / "pending").glob("*.json"):
        request.unlink(missing_ok=True)
    _write_json(root / "run.json", {"id": run_id, "state": "finished", "ok": ok})


class SpoolWorker:
    """A daisy spawn function: post this worker's context for a ``psc-worker --serve``
    process and block until it reports the worker's exit (daisy requires spawn functions
    to block for as long as their worker lives)."""

    def __init__(self, out: str) -> None:
        self.out = out

    def __call__(self, *, context) -> None:
        root = spool_dir(self.out)
        name = f"{time.time_ns():020d}-{context['task_id']}-{context['worker_id']}-{uuid.uuid4().hex[:6]}.json"
        _write_json(root / "pending" / name, {"task": context["task_id"], "context": context.to_env()})
        claimed, done = root / "claimed" / name, root / "done" / name
        last_mtime, last_change = None, time.monotonic()
        while True:
            answer = _read_json(done) if done.exists() else None
            if answer is not None:
                done.unlink(missing_ok=True)
                code = int(answer.get("returncode", 1))
                if code != 0:
                    raise RuntimeError(f"spooled worker {name} run by {answer.get('server')} exited with code {code}")
                return
            try:
                mtime = claimed.stat().st_mtime_ns
            except FileNotFoundError:
                mtime = None  # still pending, or done is being written
            if mtime != last_mtime:
                last_mtime, last_change = mtime, time.monotonic()
            elif mtime is not None and time.monotonic() - last_change > LOST_AFTER_S:
                claimed.unlink(missing_ok=True)
                raise RuntimeError(f"spooled worker {name}: its server stopped answering for {LOST_AFTER_S:.0f} s")
            time.sleep(POLL_S)


class _Child:
    def __init__(self, name: str, process: subprocess.Popen, claimed: Path) -> None:
        self.name, self.process, self.claimed = name, process, claimed
        self.touched = time.monotonic()


def serve(out: str | Path, worker_argv: list[str] | None = None, say=print) -> int:
    """``psc-worker --serve OUT.zarr``: run the run's spooled workers until it is finished.

    Waits for ``OUT.zarr/.workers/run.json`` (the server may start before the scheduler),
    then claims pending requests (oldest first, at most one per stage at a time), runs
    each as ``worker_argv + [OUT, "--context", CONTEXT]`` and writes its exit code. Returns
    0 once the run it served is finished and its children are done.
    """
    out = str(out)
    root = spool_dir(out)
    argv = worker_argv or [sys.executable, "-m", "psc.app.worker"]
    server = f"{socket.gethostname()}:{os.getpid()}"
    state_path = root / "run.json"
    waiting_said = False
    while not state_path.exists():
        if not waiting_said:
            say(f"psc-worker: waiting for a psc-segment --spool run in {out}")
            waiting_said = True
        time.sleep(POLL_S)
    # A run already finished when this server started is an earlier one: not ours.
    first = {} if waiting_said else (_read_json(state_path) or {})
    stale = first.get("id") if first.get("state") == "finished" else None
    children: dict[str, _Child] = {}
    served = 0
    say(f"psc-worker: serving {out} as {server}")
    while True:
        for task, child in list(children.items()):
            code = child.process.poll()
            if code is None:
                if time.monotonic() - child.touched > HEARTBEAT_S:
                    try:
                        os.utime(child.claimed)
                    except FileNotFoundError:
                        pass  # the scheduler gave this worker up
                    child.touched = time.monotonic()
                continue
            _write_json(root / "done" / child.name, {"returncode": code, "server": server})
            child.claimed.unlink(missing_ok=True)
            del children[task]
            say(f"psc-worker: {task}: worker {child.name} exited with code {code}")
        state = _read_json(state_path) or {}
        finished = state.get("state") == "finished" and state.get("id") != stale
        if finished and not children:
            say(f"psc-worker: the run is finished ({served} workers served)")
            return 0
        if not finished:
            for request in sorted((root / "pending").glob("*.json")):
                data = _read_json(request)
                if data is None or data.get("task") in children:
                    continue
                claimed = root / "claimed" / request.name
                try:
                    os.rename(request, claimed)  # atomic: exactly one server wins
                except FileNotFoundError:
                    continue  # another server was faster
                env = dict(os.environ, DAISY_CONTEXT=data["context"])
                process = subprocess.Popen([*argv, out, "--context", data["context"]], env=env)
                children[data["task"]] = _Child(request.name, process, claimed)
                served += 1
                say(f"psc-worker: {data['task']}: running worker {request.name}")
        time.sleep(POLL_S)
