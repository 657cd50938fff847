"""``psc-segment RAW.zarr -o OUT.zarr``: the EM half of psc-segment (every stage, resumable)."""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from rich.console import Console

from psc.app.cli import add_option, filled
from psc.models.shipped import ShippedWeights
from psc.pipelines.em.layout import default_output
from psc.pipelines.em.options import FALLBACK_THRESHOLD, EMRunOptions
from psc.pipelines.options import option_default
from psc.utils.errors import NO_SPACE_MARKERS, InputError, disk_full_error, io_error_on_full_disk, is_disk_full

EM_GROUP = "EM pipeline (RAW.zarr inputs)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The EM options, each ``None`` unless given (``psc.app.cli.add_option``): their
    defaults are ``EMRunOptions``'s, filled in by ``run_em``."""
    em = parser.add_argument_group(EM_GROUP)
    default = lambda name: option_default(EMRunOptions, name)  # noqa: E731
    add_option(em, "--workers", type=int, default=default("workers"),
               help="worker processes per stage (0: in this process)")
    add_option(em, "--threshold", type=float, help="agglomeration threshold of the written segmentation",
               default=f"the threshold the model card chose for transfer (the shipped model's: on the "
               f"leave-one-volume-out rows), else its best validation threshold, else {FALLBACK_THRESHOLD:g}")
    add_option(em, "--thresholds", type=float, nargs="+", default=default("thresholds"),
               help="thresholds whose lookup tables are stored")
    add_option(em, "--block-size", type=int, nargs=3, default=default("block_size"), metavar=("Z", "Y", "X"),
               help="block (and chunk) shape in voxels, multiples of 4")
    add_option(em, "--gt", help="ground-truth labels (zarr): score every threshold at the end")
    add_option(em, "--worker-command", help="start each worker with this shell command instead (e.g. "
               "'ssh node psc-worker {out}'); DAISY_CONTEXT tells it where the scheduler is")
    add_option(em, "--host", help="address workers connect to; 127.0.0.1 keeps it local", default="detected")
    add_option(em, "--graph", metavar="URL", default="OUT.zarr/graph.sqlite (a resume: the recorded URL)",
               help="the region graph: sqlite:///path, or postgresql://user@host:port/db for workers on other "
               "hosts (pip install \"psc[cluster]\"; the password from PGPASSWORD or ~/.pgpass, never in the URL)")
    add_option(em, "--spool", action="store_true", help="start no workers: post them under OUT.zarr/.workers/ "
               "for running 'psc-worker --serve OUT.zarr' processes (containers) to take")
    from psc.pipelines.em.stages import STAGES

    em.add_argument("--stage", nargs="+", choices=[stage.name for stage in STAGES],
                    help="run only these stages, each on its own, in pipeline order (default: all, the chained "
                    "ones as one daisy pipeline). " + "; ".join(f"{stage.name}: {stage.description}"
                                                              for stage in STAGES).replace("%", "%%"))


def run_em(args: argparse.Namespace, inputs: list[Path], console: Console) -> int:
    from psc.pipelines.em import layout
    from psc.pipelines.em.run import STAGE_NAMES, check_spool
    from psc.pipelines.devices import parse_device, resolve_device

    from psc.models.weights import EM_AFFINITY, read_card
    from psc.pipelines.em.options import threshold_for

    if len(inputs) != 1:
        raise InputError("the EM pipeline takes one RAW.zarr input per call")
    options = filled(args, EMRunOptions)
    raw = inputs[0]
    out = args.output or default_output(raw)
    from psc.pipelines.em.run import check_output

    check_output(raw, out)  # before anything is written: never into, nor deleting, the input
    if not str(out).endswith(".zarr"):
        raise InputError(f"{out}: the EM output must be a .zarr container")
    from psc.pipelines.em import preflight
    from psc.pipelines.em.run import check_output_container

    # every input checked before any work (preflight.py): a bad one is one line, not a
    # traceback, nor a failure once the whole run is done
    preflight.check_threshold_options(options.threshold, args.thresholds)
    preflight.check_input_metadata(raw, "the raw")
    preflight.check_output_metadata(out, options.force)
    if options.gt:
        preflight.check_gt(options.gt, raw)
    stages = tuple(args.stage) if args.stage else STAGE_NAMES
    if options.force or not check_output_container(out):
        preflight.check_stages_ready(out, stages, None)  # nothing done yet: refused before anything is written
    weights = options.weights or ShippedWeights.EM_AFFINITY.value.path
    # sha256 and kind checked once, before any work: a corrupt or wrong file is one line
    # here, not a failure in every block of every worker
    card = read_card(weights, EM_AFFINITY)
    threshold = threshold_for(card, options.threshold)
    if options.workers < 0:
        raise InputError(f"--workers must be >= 0, got {options.workers}")
    check_spool(options.spool, options.workers, options.worker_command)
    if options.spool or options.worker_command:
        parse_device(options.device)  # the workers' machines have the GPUs, not necessarily this one;
        device = options.device       # auto is resolved by each worker
    else:
        device = str(resolve_device(options.device))
    from psc.pipelines.em.run import check_inputs

    # every refusal prepare() makes before writing, made before the lock creates OUT.zarr:
    # a bad input leaves nothing behind (nor a container that is not a psc run deleted)
    check_inputs(str(raw), out, weights, block_size=options.block_size, precision=options.precision)
    resuming = (Path(out) / layout.TRACKING_DIR).exists() and not options.force
    graph = _graph_for(options, out)
    started = time.perf_counter()
    try:
        return _run_locked(args, options, raw, out, weights, threshold, device, stages, resuming, started,
                           console, graph)
    except BaseException as error:
        if not is_disk_full(error, out):
            raise
        # a full disk surfaces as OSError, SQLite's "disk is full", a panic of daisy's
        # scheduler or failed blocks: one line whichever it is; what was written stays
        # consistent (done markers only for finished blocks), so the same command resumes
        print(f"psc-segment: error: {out}: no space left on device ({_reason(error, out)}); free some space "
              "and run the same command again to resume", file=sys.stderr)
        if type(error).__name__ == "PanicException":
            _stop_workers()
        return 1


def _stop_workers(wait_s: float = 10.0) -> None:
    """After daisy's scheduler panicked (it writes its log on the full disk), stop the
    worker processes it had started. It no longer does, and each has a thread of this
    process waiting for it; a Python thread still waiting when the interpreter shuts
    down is ended with ``pthread_exit`` through daisy's Rust frames, which aborts the
    process (SIGABRT, exit code 134) after the error line was printed. Each thread logs
    its worker's end ("exited with code -15", a traceback) on file descriptor 2: that
    descriptor goes to /dev/null meanwhile, so the error line stays the only one."""
    import os
    import signal

    me = str(os.getpid())
    workers = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            command = (entry / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if ppid == me and b"daisy._subprocess_worker" in command:
            workers.append(int(entry.name))
    if not workers:
        return

    def running(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        for pid in workers:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while workers and time.monotonic() < deadline:  # their waiting threads reap them
            workers = [pid for pid in workers if running(pid)]
            time.sleep(0.1)
        time.sleep(0.5)  # and log their ends
        sys.stderr.flush()
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _reason(error: BaseException, out: str | Path | None = None) -> str:
    """The full disk in the error's own words, short: a file and the system's message
    for an ``OSError``; else the part of the message ("; "-separated, as a run error
    lists its stages) that names the full disk."""
    found = disk_full_error(error) or (io_error_on_full_disk(error, out) if out is not None else None) or error
    if isinstance(found, OSError) and found.strerror:
        return f"{found.filename}: {found.strerror}" if found.filename else found.strerror
    parts = " ".join(str(found).split()).split("; ")
    text = next((part for part in parts if any(m in part.lower() for m in NO_SPACE_MARKERS)), parts[0])
    return text if len(text) <= 200 else "..." + text[-197:]


def _graph_for(options: EMRunOptions, out: Path) -> str:
    """The region graph's URL for this run (``graph_url.for_run``: the recorded one on a
    resume), checked before any work: a bad URL, a password in it, psycopg missing, a
    server not reachable, or the SQLite graph for workers on other hosts is one line."""
    from psc.pipelines.em import graph_url, layout
    from psc.pipelines.em.run import check_output_container

    recorded = None
    if check_output_container(out):
        try:
            recorded = layout.RunSettings.load(out).graph
        except (KeyError, TypeError):
            recorded = None
    graph = graph_url.for_run(options.graph, out, recorded)
    graph_url.check_shared(graph, options.worker_command, options.spool, options.host)
    graph_url.check_reachable(graph)
    return graph


def _run_locked(args, options, raw, out, weights, threshold, device, stages, resuming, started, console,
                graph) -> int:
    """The run itself, under its lock (prepare, the stages, the QC picture, the scores)."""
    from psc.pipelines.em import layout, preflight
    from psc.pipelines.em.evaluate import evaluate_run, format_table
    from psc.pipelines.em.lock import run_lock
    from psc.pipelines.em.run import EMRunError, prepare, run

    with ExitStack() as held:  # the run's lock, from the settings to the QC picture: one psc-segment per OUT.zarr
        try:
            held.enter_context(run_lock(out))
            settings = prepare(str(raw), out, weights, block_size=options.block_size,
                               thresholds=options.thresholds, threshold=threshold, device=device,
                               precision=options.precision, workers=max(1, options.workers), force=options.force,
                               graph=graph)
        except OSError as error:
            if is_disk_full(error, out):
                raise
            raise InputError(f"{out}: cannot write here ({error.strerror or error})") from None
        if args.stage:  # a resumed run: are the stages this subset reads done (for the settings now)?
            preflight.check_stages_ready(out, stages, layout.RunSettings.load(out))
        if resuming:
            console.print(f"resuming the run in {out}", highlight=False)
        for warning in settings.warnings:  # the raw's intensities (intensity.measure): before the work
            print(f"psc-segment: warning: {warning}", file=sys.stderr)
        try:
            result = run(out, workers=options.workers, worker_command=options.worker_command, host=options.host,
                         stages=stages, spool=options.spool)
        except EMRunError as error:
            if is_disk_full(error, out):  # blocks failed for want of space: the one disk-full line (run_em)
                raise
            print(f"psc-segment: error: {error}", file=sys.stderr)
            return 1
        for warning in result.get("warnings", []):  # what the run found (one segment), recorded in its settings
            if warning not in settings.warnings:
                print(f"psc-segment: warning: {warning}", file=sys.stderr)
        segments = result["segments"].get(float(threshold))
        summary = f"; {segments} segments at threshold {threshold:g}" if segments is not None else ""
        console.print(f"{raw}: {time.perf_counter() - started:.1f} s{summary}", highlight=False)
        if "relabel" in stages:
            from psc.pipelines.em.qc import write_qc

            write_qc(out)
    from psc.pipelines.em.volumes import run_array_path

    for name in (layout.AFFINITIES, layout.FRAGMENTS, layout.SEGMENTATION):
        try:
            console.print(f"  {run_array_path(out, name)}", highlight=False)
        except InputError:  # not written by the stages that ran
            pass
    for name in (layout.GRAPH_FILE, layout.QC_FILE):
        if (Path(out) / name).exists():
            console.print(f"  {Path(out) / name}", highlight=False)
    if settings.graph:
        console.print(f"  region graph: {settings.graph}", highlight=False)
    if options.gt:
        print(format_table(evaluate_run(str(out), options.gt, progress=sys.stderr.isatty())))
    return 0
